"""A tier whose filesystem fills up before its budget says so (something else writes there
too, or the budget is over the filesystem's size): caching is best effort, so a publish
still publishes, and leaves nothing half-written in the tier. Live: the daemon runs in a
mount namespace of its own with an 8 MiB tmpfs as its tier."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from harness import Hostd, short_tmp, tree_digest
from test_e2e import sample

pytestmark = pytest.mark.root


def _small_tmpfs_wrap(mem: Path) -> list[str]:
    """A prefix that runs the daemon in its own mount namespace, `mem` an 8 MiB tmpfs."""
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "x", str(mem)],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace here: {probe.stderr.strip()}")
    mount = f'mount -t tmpfs -o size=8m,mode=0700 hostd-test {mem} && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh"]


def _tree(p: Path) -> Path:
    """30 files of 1 MiB and 200 small ones: ~31 MiB, four times the tier's filesystem."""
    p.mkdir()
    for i in range(30):
        (p / f"w{i:02d}.bin").write_bytes(os.urandom(1 << 20))
    for i in range(200):
        (p / f"s{i:03d}.txt").write_bytes(os.urandom(3000))
    return p


def test_a_publish_whose_tier_fills_up_is_published_whole_and_leaves_no_scratch() -> None:
    root = short_tmp("tf")
    mem = root / "mem"
    mem.mkdir()
    src = _tree(root / "src")
    tiers = [{"name": "mem", "path": str(mem), "budget": "1GiB"}]
    with Hostd(root / "h", tiers=tiers, wrap=_small_tmpfs_wrap(mem)) as h:
        assert h.proc is not None
        theirs = Path(f"/proc/{h.proc.pid}/root{mem}")
        small = root / "small"
        small.mkdir()
        (small / "a.txt").write_text("a")
        h.publish(small, "t/small")  # (the room measured)
        (theirs / "other-writer").write_bytes(b"\0" * (3 << 20))  # (then taken by another)
        out = h.publish(src, "t/full")
        assert out["files"] == 230, out
        assert out["cached"] < 230, out  # (the tier could not take them all)
        for warning in out["warnings"]:  # (where the filesystem filled before it was measured)
            assert "its filesystem is full" in warning, warning
            assert "published whole all the same" in warning, warning
        # In the daemon's mount namespace: no scratch left, and what the tier counts is
        # what its blob files hold.
        assert list((theirs / "tmp").iterdir()) == []
        held = sum(p.stat().st_size for p in (theirs / "blobs").rglob("*") if p.is_file())
        _, status = h.api("GET", "/v1/status")
        (tier,) = status["tiers"]
        assert tier["used"] == held, (tier, held)
    # Another host (a daemon with room) restores it whole from the origin.
    with Hostd(root / "other", origin=f"file://{root / 'h' / 'origin'}") as other:
        got = other.restore("t/full", root / "out", mode="copy")
        assert got["event"] == "result", got
        assert tree_digest(root / "out") == tree_digest(src)


def test_a_restore_whose_mem_tier_filesystem_is_full_fills_the_next_tier() -> None:
    """Another writer fills most of the mem tier's filesystem (a shared /dev/shm): a cold
    restore puts there what fits, the rest in the disk tier, and hands over the whole tree,
    at once and after the daemon measured the room before the other writer came. Such a
    restore used to fail on every try with 'its filesystem is full'."""
    root = short_tmp("tr")
    mem = root / "mem"
    mem.mkdir()
    src = _tree(root / "src")
    with Hostd(root / "pub") as pub:
        pub.publish(src, "t/full")
        small = root / "small"
        small.mkdir()
        (small / "a.txt").write_text("a")
        pub.publish(small, "t/small")
    tiers = [
        {"name": "mem", "path": str(mem), "budget": "1GiB"},
        {"name": "disk", "path": str(root / "disk"), "budget": "4GiB"},
    ]
    origin = f"file://{root / 'pub' / 'origin'}"
    with Hostd(root / "h", origin=origin, tiers=tiers, wrap=_small_tmpfs_wrap(mem)) as h:
        assert h.proc is not None
        theirs = Path(f"/proc/{h.proc.pid}/root{mem}")
        got = h.restore("t/small", root / "first", mode="copy")  # (the room measured)
        assert got["event"] == "result", got
        (theirs / "other-writer").write_bytes(b"\0" * (3 << 20))
        for k in range(2):  # cold, then warm from where the first put it
            got = h.restore("t/full", root / f"out{k}", mode="copy")
            assert got["event"] == "result", got
            assert tree_digest(root / f"out{k}") == tree_digest(src)
        by_source = got["bytes_by_source"]
        assert by_source["origin"] == 0, by_source
        assert by_source["disk"] > 0, by_source
        _, status = h.api("GET", "/v1/status")
        used = {t["name"]: t["used"] for t in status["tiers"]}
        held = sum(p.stat().st_size for p in (theirs / "blobs").rglob("*") if p.is_file())
        assert used["mem"] == held, (used, held)
        assert list((theirs / "tmp").iterdir()) == []
        # What the operator sees: the room the filesystem leaves it, below its budget.
        mem_status = status["tiers"][0]
        assert mem_status["room"] < 8 << 20 < mem_status["budget"], mem_status
        assert sample(h.metrics(), "hostd_tier_room_bytes", tier="mem") == mem_status["room"]
