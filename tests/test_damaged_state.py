"""Hostile or damaged state on disk, full filesystems, index and disk that disagree: each
against a real daemon (tests/harness.py), then a restore checked byte for byte.

Tests that mount a small tmpfs do it in the daemon's own mount namespace (`unshare -m`
through the harness's `wrap`), so nothing is mounted on the host; they need root.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Hostd, make_tree, rmtree, short_tmp, tree_digest
from test_faults import in_namespace, nsenter


@pytest.fixture
def work() -> Iterator[Path]:
    path = short_tmp("hq")
    yield path
    rmtree(path)


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    missing = [t for t in ("unshare", "nsenter", "mount", "find") if not shutil.which(t)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def random_file(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))


def restores_exactly(d: Hostd, src: Path, target: Path) -> None:
    out = d.restore("m/a", target)
    assert out["event"] == "result", out
    assert tree_digest(target) == tree_digest(src)


# -- 1. a symlink in blobs/ under a name that is no blobs/<xx> -------------------------------


def test_a_symlink_in_blobs_is_never_followed_and_nothing_outside_is_removed(work: Path) -> None:
    d = Hostd(work / "d")
    src = make_tree(work / "src")
    with d:
        d.publish(src, "m/a")
    # Outside every tier: a directory and a symlink under names a blob could have.
    outside = work / "outside"
    precious = outside / ("ab" * 32)
    precious.mkdir(parents=True)
    (precious / "precious").write_text("keep me")
    os.symlink("/etc/hostname", outside / ("cd" * 32))
    os.symlink(outside, d.root / "mem" / "blobs" / "junk")
    with d:
        restores_exactly(d, src, work / "out")
    assert (precious / "precious").read_text() == "keep me", d.log()
    assert os.path.islink(outside / ("cd" * 32)), d.log()


# -- 2. a damaged index: a clear refusal naming it, not a traceback ----------------------------


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "garbage", "directory"])
def test_a_damaged_index_refuses_to_start_naming_it(work: Path, damage: str) -> None:
    d = Hostd(work / "d")
    src = make_tree(work / "src")
    with d:
        d.publish(src, "m/a")
    idx = d.root / "state" / "index.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(f"{idx}{suffix}").unlink(missing_ok=True)
    if damage == "truncated":
        os.truncate(idx, 1000)
    elif damage == "zeroed":
        idx.write_bytes(bytes(idx.stat().st_size))
    elif damage == "garbage":
        idx.write_bytes(random.Random(1).randbytes(8192))
    else:
        idx.unlink()
        idx.mkdir()
    with pytest.raises(RuntimeError, match="hostd exited with 1") as e:
        d.start()
    log = str(e.value)
    assert "Traceback" not in log, log
    assert str(idx) in log, log


# -- 3. a tier owned by another user ------------------------------------------------------------


def test_a_tier_owned_by_another_user_is_refused(work: Path) -> None:
    need_root()
    d = Hostd(work / "d")
    src = make_tree(work / "src")
    with d:
        d.publish(src, "m/a")
    mem = d.root / "mem"
    for p in [mem, *mem.rglob("*")]:
        os.lchown(p, 65534, 65534)
    # Its owner (nobody) may now replace a blob with other bytes of the same size and
    # mtime: a new inode, never hashed again.
    (blob,) = [p for p in (mem / "blobs").rglob("*") if p.is_file() and p.stat().st_size > 1 << 20]
    st = blob.stat()
    bad = blob.with_name("x")
    bad.write_bytes(b"\0" * st.st_size)
    os.utime(bad, ns=(st.st_mtime_ns, st.st_mtime_ns))
    bad.chmod(0o444)
    os.lchown(bad, 65534, 65534)
    os.replace(bad, blob)
    refused = ""
    try:
        d.start()
    except RuntimeError as e:  # refused: fine, if it says why
        refused = str(e)
    if refused:
        assert "owned by uid 65534" in refused, refused
        assert str(mem) in refused, refused
        return
    try:
        restores_exactly(d, src, work / "out")
    finally:
        d.close()


# -- 4. the index's filesystem full ------------------------------------------------------------


def test_a_full_index_filesystem_fails_a_restore_naming_it(work: Path) -> None:
    need_root()
    src = make_tree(work / "src")
    with Hostd(work / "p", origin=f"file://{work}/origin") as p:
        p.publish(src, "m/a")
    state = work / "d" / "state"
    state.mkdir(parents=True)
    d = Hostd(
        work / "d",
        origin=f"file://{work}/origin",
        wrap=in_namespace(f"mount -t tmpfs -o size=1m,mode=0700 hostd-q {state}"),
    )
    with d:
        nsenter(d, "sh", "-c", f"dd if=/dev/zero of={state}/filler bs=4k 2>/dev/null || true")
        out = d.restore("m/a", work / "out")
        assert out["event"] == "error", out
        assert out["error"] != "internal", out
        assert "index" in out["message"], out
        assert "full" in out["message"], out
        assert not (work / "out").exists()
        nsenter(d, "rm", f"{state}/filler")
        restores_exactly(d, src, work / "out2")


# -- 5. a publish whose tier fills up leaves no blob uncounted --------------------------------


def test_a_publish_whose_tier_fills_up_leaves_no_uncounted_blob(work: Path) -> None:
    """A 20 MiB tier under a 1 GiB budget, and a 40 MiB tree: the publish caches what fits
    (best effort: the tree is published whole), and every blob file in the tier is one its
    status counts, and no more, once every store thread is done."""
    need_root()
    src = work / "src"
    for i in range(6):
        random_file(src / f"f{i}.bin", 5 << 20, i)
    for i in range(200):
        random_file(src / "small" / f"s{i}", 50 << 10, 100 + i)
    tier = work / "d" / "mem"
    tier.mkdir(parents=True)
    d = Hostd(
        work / "d",
        tiers=[{"name": "mem", "path": str(tier), "budget": "1GiB"}],
        wrap=in_namespace(f"mount -t tmpfs -o size=20m,mode=0700 hostd-q {tier}"),
    )
    with d:
        out = d.stream("/v1/publish", {"path": str(src), "ref": "m/a"})
        assert out["event"] == "result", out
        assert out["files"] == 206, out
        assert out["cached"] < 206, out
        # (A store thread still running when the publish ended may finish a moment later.)
        deadline = time.monotonic() + 10
        while True:
            status = d.api("GET", "/v1/status")[1]["tiers"][0]
            found = nsenter(d, "find", str(tier / "blobs"), "-type", "f", "-printf", "%s\n")
            sizes = [int(n) for n in found.split()]
            if (status["blobs"], status["used"]) == (len(sizes), sum(sizes)):
                break
            assert time.monotonic() < deadline, (status, len(sizes), sum(sizes))
            time.sleep(0.2)
