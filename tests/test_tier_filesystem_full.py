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
        out = h.publish(src, "t/full")
        assert out["files"] == 230, out
        assert out["cached"] < 230, out  # (the tier could not take them all)
        (warning,) = out["warnings"]
        assert "its filesystem is full" in warning, warning
        assert "published whole all the same" in warning, warning
        # In the daemon's mount namespace: no scratch left, and what the tier counts is
        # what its blob files hold.
        assert h.proc is not None
        theirs = Path(f"/proc/{h.proc.pid}/root{mem}")
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
