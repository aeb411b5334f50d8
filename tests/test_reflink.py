"""Copies from a tier on a filesystem with reflinks (XFS here) into a target on the same
filesystem share the blob's extents rather than writing the bytes again: a `copy` restore,
cold (each file placed while the rest is fetched) or warm. Checked the way an operator
would, with `filefrag -v`, which marks shared extents.

Needs root, util-linux (losetup, mount), xfsprogs (mkfs.xfs), e2fsprogs (filefrag) and
loop devices; skipped with the reason otherwise (.ci/run installs xfsprogs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Hostd, rmtree, short_tmp

pytestmark = pytest.mark.root

IMAGE_SIZE = 512 * 1024 * 1024  # sparse; mkfs.xfs refuses filesystems under 300 MiB
TOOLS = ("losetup", "mkfs.xfs", "mount", "umount", "filefrag")


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root: makes a loop device and mounts XFS on it"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (util-linux, xfsprogs, e2fsprogs)"
    if not Path("/dev/loop-control").exists():
        return "no loop devices here (/dev/loop-control is missing)"
    return None


def sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise OSError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


@pytest.fixture
def xfs() -> Iterator[Path]:
    why = unavailable()
    if why:
        pytest.skip(why)
    work = short_tmp("rl")
    image, mnt = work / "xfs.img", work / "mnt"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    sh("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
    mnt.mkdir()
    loop = sh("losetup", "--find", "--show", str(image)).strip()
    try:
        sh("mount", "-t", "xfs", loop, str(mnt))
        try:
            yield mnt
        finally:
            sh("umount", str(mnt))
    finally:
        sh("losetup", "--detach", loop)
        rmtree(work)


def shared(path: Path) -> bool:
    """Whether every extent of `path` is shared with another file (filefrag's flag)."""
    lines = [ln for ln in sh("filefrag", "-v", str(path)).splitlines() if ln.strip()[:1].isdigit()]
    return bool(lines) and all("shared" in ln for ln in lines)


def test_copies_from_a_tier_on_the_same_filesystem_are_reflinks(xfs: Path) -> None:
    work = short_tmp("rs")
    try:
        src = work / "src"
        src.mkdir()
        files = {f"w{i}.bin": os.urandom((3 << 20) + i * 4096) for i in range(3)}
        for name, data in files.items():
            (src / name).write_bytes(data)
        origin = f"file://{work}/origin"
        with Hostd(work / "pub", origin=origin, chunk_size="1MiB") as pub:
            pub.publish(src, "m/w")
        tiers = [{"name": "disk", "path": str(xfs / "tier"), "budget": "256MiB"}]
        with Hostd(work / "d", origin=origin, tiers=tiers) as d:
            for target in (xfs / "cold", xfs / "warm"):  # the first fetches, the second not
                out = d.restore("m/w", target, mode="copy")
                assert out["copied"] == len(files)
                for name, data in files.items():
                    assert (target / name).read_bytes() == data
                    assert shared(target / name), sh("filefrag", "-v", str(target / name))
            # A copy is the caller's own file: writing it leaves the blob and the other as
            # they were.
            with open(xfs / "cold" / "w0.bin", "r+b") as f:
                f.write(b"changed")
            assert (xfs / "warm" / "w0.bin").read_bytes() == files["w0.bin"]
            assert d.restore("m/w", xfs / "again", mode="copy")["copied"] == len(files)
            assert (xfs / "again" / "w0.bin").read_bytes() == files["w0.bin"]
    finally:
        rmtree(work)
