# ruff: noqa: F811  (the `work` fixture, imported)
"""A copy restore racing a root process that writes through another caller's link to the
same blob, under the default `[access] link_checks = "lease"`: live, with real leases. The
write breaks the blob's lease first; the daemon gives it up at once and the writer goes on,
perhaps while a copy of that blob is being made (materialize.Watch)."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from harness import outcome, stream, tree_digest
from test_trust import (  # noqa: F401  (fixtures)
    _big_and_small,
    _copy_by,
    _nobody_caller,
    _one_blob,
    _write_at_the_end,
    daemon,
    nobody_dir,
    nobody_stream,
    wait_for,
    work,
)

from hostd.asuser import AsUser
from hostd.errors import ChunkCorrupt
from hostd.materialize import State, Watch

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acts as other users: needs root")

ATTEMPTS = 8  # the copy lasts tens of milliseconds: the write must land inside one of them


def _copy_racing(d: Any, target: Path, linked: Path) -> list[dict[str, Any]]:
    """The events of root's copy restore of t/big into `target`, with `linked` written as
    soon as the hidden build exists (its blobs checked, their copies about to be made or
    under way), or after the restore."""
    body = {"ref": "t/big", "target": str(target), "mode": "copy"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(stream, d.socket, "/v1/restore", body)
        wait_for(lambda: job.done() or any(target.parent.glob(f".{target.name}.hostd-*")), step=0)
        _write_at_the_end(linked, b"EVIL")
        return job.result()


def test_a_copy_never_hands_over_what_root_wrote_through_a_non_writers_link_meanwhile(
    work: Path,
) -> None:
    """nobody link-restores a big file (the daemon holds a read lease on its blob). Root
    copy-restores the same snapshot while a root process writes through nobody's link and
    puts the mtime back: the copy either saw the published bytes, or was read back (its
    blob moved, its lease broke), found bad, and built again from the blob fetched anew.
    Root's tree is the published one every time; a copy used to hand the write over."""
    src = _big_and_small(work)
    want = tree_digest(src)
    home = nobody_dir(work / "home")
    caught = 0
    with daemon(work) as d:
        d.publish(src, "t/big")
        for attempt in range(ATTEMPTS):
            mine = home / f"l{attempt}"
            out = nobody_stream(
                d.socket, "/v1/restore", {"ref": "t/big", "target": str(mine), "mode": "link"}
            )
            assert out["event"] == "result", out
            assert out["linked"] == 2, out
            target = work / f"c{attempt}"
            events = _copy_racing(d, target, mine / "big.bin")
            out = outcome(events)
            assert out["event"] == "result", out
            assert tree_digest(target) == want, f"attempt {attempt}: the write was handed over"
            assert not any(work.glob(".c*")), "a build left behind"
            if any(e.get("warning") == "rebuilt" for e in events):
                caught += 1
                break
    assert caught, "every copy was over before the write"


def test_a_lease_taken_after_the_copy_opened_its_blob_vouches_for_no_copy(work: Path) -> None:
    """No lease held on the blob as the copy's batch was opened (the daemon restarted, say):
    a root process writes through a link before the copy reads it and puts the bytes back
    after, and a re-hash (another restore's check) takes the blob's lease before the batch
    is finished. That lease holds on the inode at the finish, but vouches for nothing
    before its take: the copy is read back, and not handed over. (Watch.held used to be
    asked at the finish alone, and the write was handed over.)"""
    data = os.urandom(100_000)
    m, blob = _one_blob(work, data, 0o644)
    home = nobody_dir(work / "home")
    taken: list[State] = []  # the blob's state as a re-hash took its lease

    class WrittenThenPutBack(AsUser):
        def files(
            self, items: Sequence[tuple[str, int, int, str, int | None]], fds: Sequence[int]
        ) -> None:
            st = blob.stat()
            blob.chmod(0o644)
            with open(blob, "r+b", buffering=0) as f:
                f.write(b"EVIL")
                super().files(items, fds)
                f.seek(0)
                f.write(data[:4])
            blob.chmod(0o444)
            os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
            taken.append(verified(b""))  # (a re-hash: its lease holds from now on)

    def verified(_d: bytes) -> State:
        st = blob.stat()
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def held(_d: bytes, _dev: int, _ino: int) -> tuple[int, State] | None:
        return (7, taken[0]) if taken else None

    watch = Watch(
        every=True,
        recorded=lambda ds: ([verified(d) for d in ds], [None] * len(ds)),
        held=held,
    )
    with _nobody_caller() as (spawner, caller):
        fs = WrittenThenPutBack(caller, *spawner.spawn())
        with pytest.raises(ChunkCorrupt, match="written to through a link"):
            _copy_by(fs, f"{home}/out", m, blob, watch)
    assert not (home / "out").exists(), "the written copy was handed over"
