# ruff: noqa: F811  (the `work` fixture, imported)
"""[access] link_checks = "lease" against a root process that reaches a caller's linked tree,
and against bad luck: live, with the daemon's real read leases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import rmtree, tree_digest
from test_e2e import sample
from test_trust import (  # noqa: F401  (fixtures)
    daemon,
    later_restores_get,
    link_as_nobody,
    nobody_dir,
    nobody_stream,
    wait_for,
    work,
    world_readable_tree,
    write_through,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acts as other users: needs root")


def many_files_tree(p: Path, n: int = 24) -> Path:
    p.mkdir(parents=True)
    for i in range(n):
        (p / f"f{i:04d}.bin").write_bytes(os.urandom(4096 + i))
    return world_readable_tree(p)


def test_a_writer_opening_linked_files_one_after_another_is_never_held_for_the_break_time(
    work: Path,
) -> None:
    """Every open for writing of a leased blob waits until the daemon gives the lease up.
    A root process opening a restored tree's files one after another (an `rsync --inplace`,
    a `sed -i`-like tool, a checksum-fixing script) breaks a lease while the scan that the
    previous break started is still running: that break must get a scan of its own
    (`leases_broken` goes round again), or the open waits for the kernel's
    lease-break-time (45 s)."""
    src = many_files_tree(work / "src", 2000)
    home = nobody_dir(work / "home")
    with daemon(work, access={"link_checks": "lease"}) as d:
        d.publish(src, "t/l")
        link_as_nobody(d, home / "a")
        assert sample(d.metrics(), "hostd_link_leases") >= 2000
        files = sorted(str(p) for p in (home / "a").glob("f*.bin"))[:40]
        code = (
            "import json, os, sys, time\n"
            "took = []\n"
            "for p in json.loads(sys.argv[1]):\n"
            "    t = time.monotonic(); os.close(os.open(p, os.O_WRONLY)); "
            "took.append(time.monotonic() - t)\n"
            "    print(json.dumps(took), flush=True)\n"
        )
        w = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(files)], stdout=subprocess.PIPE, text=True
        )
        try:
            stdout, _ = w.communicate(timeout=8)
        except subprocess.TimeoutExpired:
            w.kill()
            stdout, _ = w.communicate()
        lines = stdout.splitlines()
        done = json.loads(lines[-1]) if lines else []
        assert len(done) == len(files), f"an open waited for the break time: {done}"
        assert max(done) < 5, done


@pytest.mark.parametrize("checks", ["writers", "lease"])
def test_leases_leave_the_daemon_descriptors_to_work_with(work: Path, checks: str) -> None:
    """Leases cost a descriptor each, capped at 100,000 whatever the process may open: where
    RLIMIT_NOFILE is lower (a container's limit, a per-user daemon started from a shell),
    the leases of the trees linked out take every descriptor, and then restores fail with
    EMFILE (and so would each accept), not only the leases that cannot be taken."""
    home = nobody_dir(work / "home")
    limit = ["sh", "-c", 'ulimit -n 2048 && exec "$@"', "sh"]
    with daemon(work, access={"link_checks": checks}, wrap=limit) as d:
        for t in range(2):
            d.publish(many_files_tree(work / f"src{t}", 1100), f"t/{t}")
        for t in range(2):
            out = nobody_stream(
                d.socket, "/v1/restore", {"ref": f"t/{t}", "target": f"{home}/a{t}", "mode": "link"}
            )
            if out["event"] != "result":
                print(d.log()[-6000:])
            assert out["event"] == "result", (t, out)
        for k in range(2):
            out = nobody_stream(
                d.socket, "/v1/restore", {"ref": "t/0", "target": f"{home}/c{k}", "mode": "copy"}
            )
            assert out["event"] == "result", out
            out = nobody_stream(
                d.socket, "/v1/restore", {"ref": "t/1", "target": f"{home}/b{k}", "mode": "link"}
            )
            assert out["event"] == "result", out


def test_a_writable_mapping_kept_past_a_broken_lease_cannot_launder_a_write(work: Path) -> None:
    """Once a lease is broken the blob is checked by ctime. A root process that reaches the
    tree opens it for writing (the lease breaks), maps it shared and writable, closes the
    descriptor, and stores a byte equal to what is there: the write fault moves the ctime,
    and leaves the page dirty and writable. A store into that page later faults no more, so
    it moves no ctime until writeback: a re-hash that found the bytes intact and recorded
    that ctime would vouch for whatever the mapping writes next. The mapping keeps the
    inode open for writing, so the re-hash, which takes the blob's lease first, cannot: the
    blob counts as bad, and is fetched again into a new inode the mapping does not reach."""
    import mmap

    src = world_readable_tree(work / "src")
    home = nobody_dir(work / "home")
    with daemon(work, access={"link_checks": "lease"}) as d:
        d.publish(src, "t/l")
        want = tree_digest(src)
        link_as_nobody(d, home / "a")
        p = home / "a" / "weights.bin"
        fd = os.open(p, os.O_RDWR)  # the lease breaks
        m = mmap.mmap(fd, 0, mmap.MAP_SHARED)
        os.close(fd)
        try:
            m[100] = m[100]  # the fault: the ctime moves, the page is dirty and writable
            wait_for(lambda: "was opened for writing through a link" in d.log())
            out = d.restore("t/l", work / "c0", mode="copy")  # re-hashed: intact
            assert out["event"] == "result", out
            assert tree_digest(work / "c0") == want
            m[100] = m[100] ^ 0xFF  # (no fault, unless writeback cleaned the page: no ctime)
            out = d.restore("t/l", work / "c1", mode="copy")
            assert out["event"] == "result", out
            assert tree_digest(work / "c1") == want
        finally:
            m.close()


def test_an_open_for_reading_with_o_trunc_breaks_no_lease_but_the_size_check_catches_it(
    work: Path,
) -> None:
    """open(O_RDONLY | O_TRUNC) by root truncates the file, and the kernel breaks only
    write leases for an open for reading (vfs: break_lease(inode, O_RDONLY); handle_truncate
    breaks none): the read lease still holds though the bytes are gone. The size check that
    every use makes catches it (the only change this makes is to size 0)."""
    src = world_readable_tree(work / "src")
    home = nobody_dir(work / "home")
    with daemon(work, access={"link_checks": "lease"}) as d:
        d.publish(src, "t/l")
        link_as_nobody(d, home / "a")
        p = home / "a" / "weights.bin"
        st = p.stat()
        os.close(os.open(p, os.O_RDONLY | os.O_TRUNC))
        assert p.stat().st_size == 0
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        later_restores_get(d, src, home, work)


def test_blobs_linked_before_a_restart_are_rehashed_before_they_are_trusted(work: Path) -> None:
    """Leases die with the daemon: a write through a link while it is down (mtime put back)
    must be caught after the restart, by the ctime, for copy and link restores alike."""
    src = world_readable_tree(work / "src")
    home = nobody_dir(work / "home")
    with daemon(work, access={"link_checks": "lease"}) as d:
        d.publish(src, "t/l")
        link_as_nobody(d, home / "a")
    write_through(home / "a" / "weights.bin")  # no daemon: no lease to break
    with daemon(work, access={"link_checks": "lease"}) as d:
        later_restores_get(d, src, home, work)


def test_a_clean_restart_rehashes_nothing_whose_lease_held(work: Path) -> None:
    """A clean stop records, for each blob whose lease still holds, the ctime its links and
    unlinks gave it (the lease says no one wrote it): after the restart, with no lease, the
    ctime check trusts those blobs, and nothing is re-hashed. (A write while the daemon is
    down moves the ctime again: the test above.)"""
    src = world_readable_tree(work / "src")
    home = nobody_dir(work / "home")
    with daemon(work, access={"link_checks": "lease"}) as d:
        d.publish(src, "t/l")
        link_as_nobody(d, home / "a")
        link_as_nobody(d, home / "b")
        rmtree(home / "a")  # (unlinks: every linked blob's ctime moves again)
    with daemon(work, access={"link_checks": "lease"}) as d:
        link_as_nobody(d, home / "c")
        assert tree_digest(home / "c") == tree_digest(src)
        assert sample(d.metrics(), "hostd_blob_rehashes_total", tier="mem") == 0


def test_a_broken_lease_has_its_blob_rehashed_though_nothing_was_written_yet(work: Path) -> None:
    """An open for writing breaks the lease before a byte is written: the ctime has not
    moved, and a copy that trusted it would read whatever the opener writes next. A broken
    lease makes its blob's state unknown: the next use re-hashes it."""
    src = world_readable_tree(work / "src")
    home = nobody_dir(work / "home")
    with daemon(work, access={"link_checks": "lease"}) as d:
        d.publish(src, "t/l")
        link_as_nobody(d, home / "a")
        # verify re-hashes every blob (their leases held): their records take the ctime the
        # links gave them, so only a doubt, not the ctime, can make the next use re-hash
        assert d.stream("/v1/verify", {})["event"] == "result"
        before = sample(d.metrics(), "hostd_blob_rehashes_total", tier="mem")
        os.close(os.open(home / "a" / "weights.bin", os.O_WRONLY))  # opened, nothing written
        wait_for(lambda: "was opened for writing through a link" in d.log())
        out = d.restore("t/l", work / "c", mode="copy")
        assert out["event"] == "result", out
        assert tree_digest(work / "c") == tree_digest(src)
        assert sample(d.metrics(), "hostd_blob_rehashes_total", tier="mem") == before + 1
