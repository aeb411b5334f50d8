"""Progressive restores, as a loader uses them: the target appears at once, each file lands
whole as soon as its blob is verified (a `file` event says so), the load order sets what is
fetched first, and a failure takes back what landed unless asked to keep it. A real daemon
(tests/harness.py) fetches from a plain HTTP origin that holds chosen chunks until the test
lets them go; nothing sleeps."""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import HeldOrigin, Hostd, outcome, request, rmtree, short_tmp, small_ext4, stream

from hostd import fsops
from hostd.cli import main
from hostd.client import Client
from hostd.core.ids import chunk_id
from hostd.errors import HostdError, TargetExists, UsageError

DEADLINE = 60.0
CHUNK = 64 * 1024
JSON = dict[str, Any]


@pytest.fixture
def work() -> Iterator[Path]:
    root = short_tmp("pr")
    try:
        yield root
    finally:
        rmtree(root)


# Files of two chunks each (not packed: a file is packed only below the chunk size).
NAMES = ["a.bin", "b.bin", "w/c.bin", "w/d.bin"]


@pytest.fixture
def published(work: Path) -> dict[str, bytes]:
    src = work / "src"
    files = {n: os.urandom(CHUNK + 1000 + i) for i, n in enumerate(NAMES)}
    for n, data in files.items():
        (src / n).parent.mkdir(parents=True, exist_ok=True)
        (src / n).write_bytes(data)
    (src / "empty").write_bytes(b"")
    (src / "w" / "to-a").symlink_to("../a.bin")
    os.utime(src / "b.bin", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    # pack_size 0: each chunk an object of its own, whose GETs HeldOrigin holds one by one
    with Hostd(
        work / "pub", origin=f"file://{work}/origin", chunk_size="64KiB", pack_size=0
    ) as pub:
        pub.publish(src, "m/weights")
    return files


def first_chunk(data: bytes) -> bytes:
    return chunk_id(data[:CHUNK])


class Restore:
    """A progressive restore on a thread of its own, its `file` events in a queue (and its
    `range` events, in the order they came, where `ranges`)."""

    def __init__(self, h: Hostd, target: Path, *, ranges: bool = False, **kwargs: Any) -> None:
        self.events: queue.Queue[JSON] = queue.Queue()
        if ranges:
            kwargs.update(ranges=True, on_range=self.events.put)
        self.result: JSON | None = None
        self.error: BaseException | None = None
        self.client = Client(h.socket)
        self.thread = threading.Thread(target=self._run, args=(target, kwargs), daemon=True)
        self.thread.start()

    def _run(self, target: Path, kwargs: dict[str, Any]) -> None:
        ref = kwargs.pop("ref", "m/weights")
        try:
            self.result = self.client.restore(
                ref, target, progressive=True, on_file=self.events.put, **kwargs
            )
        except BaseException as e:
            self.error = e

    def next_file(self) -> JSON:
        return self.events.get(timeout=DEADLINE)

    def wait(self) -> JSON:
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@pytest.mark.parametrize("mode", ["copy", "link"])
def test_each_file_lands_whole_as_its_blob_is_verified(
    work: Path, published: dict[str, bytes], mode: str
) -> None:
    target = work / "out"
    # link: the target beside the tier, on one filesystem, and root trusted with links
    tiers = [{"name": "mem", "path": str(work / "d" / "mem"), "budget": "1GiB"}]
    trusted = {"link_to_writers": True}
    with (
        HeldOrigin(work / "origin") as origin,
        Hostd(work / "d", origin=origin.url, fetch_concurrency=2, tiers=tiers, access=trusted) as h,
    ):
        held = origin.hold(first_chunk(published["b.bin"]))
        r = Restore(h, target, mode=mode)
        landed: dict[str, JSON] = {}
        # Every file but b.bin lands while b.bin's chunk is held.
        while len(landed) < 4:
            ev = r.next_file()
            landed[ev["path"]] = ev
            # a file named in an event is there, whole, with its recorded mtime
            p = target / ev["path"]
            assert p.stat().st_size == ev["size"]
            if ev["size"]:
                assert p.read_bytes() == published[ev["path"]]
        assert set(landed) == {"empty", "a.bin", "w/c.bin", "w/d.bin"}
        assert target.is_dir()
        # b.bin is not there under its name, nor anything that looks like it
        assert sorted(os.listdir(target)) == ["a.bin", "empty", "w"]
        assert r.result is None  # the restore is still running
        held.set()
        ev = r.next_file()
        assert ev["path"] == "b.bin"
        result = r.wait()
    assert result["progressive"] is True
    assert result["files"] == 5
    assert result["linked" if mode == "link" else "copied"] == 4
    if mode == "link":  # the file is the verified blob itself
        assert (target / "b.bin").stat().st_nlink == 2
    assert (target / "b.bin").read_bytes() == published["b.bin"]
    assert (target / "b.bin").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert os.readlink(target / "w" / "to-a") == "../a.bin"
    # counts run up to the totals, one event per file
    assert ev["done_files"] == ev["total_files"] == 5
    assert ev["done_bytes"] == ev["total_bytes"] == sum(map(len, published.values()))


def second_chunk(data: bytes) -> bytes:
    return chunk_id(data[CHUNK : 2 * CHUNK])


def scratch(target: Path) -> list[str]:
    return [str(p.relative_to(target)) for p in target.rglob(".hostd*")]


def test_with_ranges_each_verified_chunk_can_be_read_before_its_file_lands(
    work: Path, published: dict[str, bytes]
) -> None:
    """`ranges`: a file of several chunks is written under a scratch name a verified chunk
    at a time, a `range` event each (the bytes are there when it comes), and lands whole
    under its own name after its last range, as any file."""
    target = work / "out"
    with (
        HeldOrigin(work / "origin") as origin,
        Hostd(work / "d", origin=origin.url, fetch_concurrency=2) as h,
    ):
        held = origin.hold(second_chunk(published["b.bin"]))
        r = Restore(h, target, ranges=True, order=["b.bin"])
        events = [r.next_file()]
        while events[-1].get("event") != "range" or events[-1]["path"] != "b.bin":
            events.append(r.next_file())
        ev = events[-1]
        assert (ev["offset"], ev["length"]) == (0, CHUNK)
        with open(target / ev["part"], "rb") as part:  # the caller's to read
            assert part.read(CHUNK) == published["b.bin"][:CHUNK]
        assert ev["part"] in scratch(target)
        assert not (target / "b.bin").exists()  # not under its name until whole
        assert r.result is None
        held.set()
        result = r.wait()
    while not r.events.empty():
        events.append(r.events.get_nowait())
    assert result["copied"] == 4
    for name, data in published.items():
        assert (target / name).read_bytes() == data
        told = [i for i, e in enumerate(events) if e["path"] == name and e["event"] == "range"]
        landed = [i for i, e in enumerate(events) if e["path"] == name and e["event"] == "file"]
        # each chunk told once, each before the file's own event
        got = sorted((events[i]["offset"], events[i]["length"]) for i in told)
        assert got == [(0, CHUNK), (CHUNK, len(data) - CHUNK)]
        assert len(landed) == 1
        assert max(told) < landed[0]
    assert (target / "b.bin").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert scratch(target) == []


@pytest.mark.parametrize("keep", [False, True])
def test_a_failed_restore_with_ranges_leaves_no_file_written_in_part(
    work: Path, published: dict[str, bytes], keep: bool
) -> None:
    """A file of which some ranges were written when the restore failed is not whole:
    removed, whatever `keep_partial` says; what landed whole goes or stays as it says."""
    target = work / "out"
    with (
        HeldOrigin(work / "origin") as origin,
        Hostd(work / "d", origin=origin.url, fetch_concurrency=1, retries=1) as h,
    ):
        origin.missing.add(second_chunk(published["b.bin"]).hex())
        r = Restore(h, target, ranges=True, order=["a.bin", "b.bin"], keep_partial=keep)
        with pytest.raises(HostdError, match=r"b\.bin"):
            r.wait()
        told = []
        while not r.events.empty():
            told.append(r.events.get_nowait())
        assert {"event": "range", "path": "b.bin", "offset": 0, "length": CHUNK}.items() <= next(
            e for e in told if e["path"] == "b.bin"
        ).items()  # its first chunk was written before the second was found missing
        if keep:
            assert (target / "a.bin").read_bytes() == published["a.bin"]
            assert not (target / "b.bin").exists()
            assert scratch(target) == []
        else:
            assert not target.exists()


def test_with_ranges_the_chunks_a_blob_had_already_are_copied_in_before_it_lands(
    work: Path, published: dict[str, bytes]
) -> None:
    """A blob resumed (its first chunk kept from a failed restore) is fetched on from its
    second chunk: only that one is written by range; the first is copied in from the blob
    before the file lands."""
    with (
        HeldOrigin(work / "origin") as origin,
        Hostd(work / "d", origin=origin.url, fetch_concurrency=1, retries=1) as h,
    ):
        origin.missing.add(second_chunk(published["b.bin"]).hex())
        with Client(h.socket) as c, pytest.raises(HostdError, match=r"b\.bin"):
            c.restore("m/weights", work / "first")
        origin.missing.clear()
        r = Restore(h, work / "out", ranges=True)
        r.wait()
    events = [r.events.get_nowait() for _ in range(r.events.qsize())]
    told = [
        (e["offset"], e["size"]) for e in events if e["event"] == "range" and e["path"] == "b.bin"
    ]
    assert told == [(CHUNK, len(published["b.bin"]))]
    for name, data in published.items():
        assert (work / "out" / name).read_bytes() == data
    assert scratch(work / "out") == []


def test_with_ranges_a_file_that_is_linked_is_not_written_by_range(
    work: Path, published: dict[str, bytes]
) -> None:
    """A range is a write of the file's bytes, which a link does not make: a file the
    restore links (links allowed, its mode one a blob can show) lands as a link, cold."""
    tiers = [{"name": "mem", "path": str(work / "d" / "mem"), "budget": "1GiB"}]
    trusted = {"link_to_writers": True}
    with Hostd(work / "d", origin=f"file://{work}/origin", tiers=tiers, access=trusted) as h:
        r = Restore(h, work / "out", ranges=True)
        result = r.wait()
    assert result["linked"] == 4
    assert all(r.events.get_nowait()["event"] == "file" for _ in range(r.events.qsize()))
    assert (work / "out" / "b.bin").stat().st_nlink == 2


def test_with_ranges_a_file_that_cannot_link_across_filesystems_is_written_by_range(
    work: Path, published: dict[str, bytes]
) -> None:
    """Links allowed, but the tier on /dev/shm and the target elsewhere: no link can be
    made there (EXDEV), every file is copied, so those of several chunks are ranged."""
    shm = Path(tempfile.mkdtemp(prefix="hostd-pr-", dir="/dev/shm"))
    try:
        assert os.stat(shm).st_dev != os.stat(work).st_dev
        tiers = [{"name": "mem", "path": str(shm / "mem"), "budget": "1GiB"}]
        trusted = {"link_to_writers": True}
        with Hostd(work / "d", origin=f"file://{work}/origin", tiers=tiers, access=trusted) as h:
            r = Restore(h, work / "out", ranges=True)
            result = r.wait()
    finally:
        rmtree(shm)
    assert (result["linked"], result["copied"]) == (0, 4)
    events = [r.events.get_nowait() for _ in range(r.events.qsize())]
    assert {e["path"] for e in events if e["event"] == "range"} == set(NAMES)
    for name, data in published.items():
        assert (work / "out" / name).read_bytes() == data


def test_with_ranges_a_file_whose_blob_is_cached_lands_whole_without_ranges(
    work: Path, published: dict[str, bytes]
) -> None:
    with Hostd(work / "d", origin=f"file://{work}/origin") as h:
        with Client(h.socket) as c:
            c.restore("m/weights", work / "warm")  # every blob cached
        r = Restore(h, work / "out", ranges=True)
        assert r.wait()["copied"] == 4
        assert all(r.events.get_nowait()["event"] == "file" for _ in range(r.events.qsize()))
    for name, data in published.items():
        assert (work / "out" / name).read_bytes() == data
    assert (work / "out" / "b.bin").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert scratch(work / "out") == []


def test_the_load_order_is_the_fetch_order(work: Path, published: dict[str, bytes]) -> None:
    with (
        HeldOrigin(work / "origin") as origin,
        Hostd(work / "d", origin=origin.url, fetch_concurrency=1) as h,
    ):
        r = Restore(h, work / "out", order=["w/d.bin", "w/*", "b.bin"])
        result = r.wait()
        assert result["files"] == 5
        asked = [origin.asked.get_nowait() for _ in range(origin.asked.qsize())]
    firsts = {first_chunk(published[n]).hex(): n for n in NAMES}
    in_order = [firsts[k] for k in asked if k in firsts]
    assert in_order == ["w/d.bin", "w/c.bin", "b.bin", "a.bin"]
    events = []
    while not r.events.empty():
        events.append(r.events.get_nowait()["path"])
    # the empty file first (made with the directories), the symlink last (with its target)
    assert events == ["empty", *in_order, "w/to-a"]


@pytest.mark.parametrize("keep", [False, True])
def test_a_failed_restore_takes_back_what_landed_unless_kept(
    work: Path, published: dict[str, bytes], keep: bool
) -> None:
    target = work / "out"
    with (
        HeldOrigin(work / "origin") as origin,
        Hostd(work / "d", origin=origin.url, fetch_concurrency=1, retries=1) as h,
    ):
        origin.missing.add(first_chunk(published["b.bin"]).hex())
        r = Restore(h, target, order=["a.bin"], keep_partial=keep)
        with pytest.raises(HostdError, match=r"b\.bin"):
            r.wait()
        landed = []
        while not r.events.empty():
            landed.append(r.events.get_nowait()["path"])
        assert "a.bin" in landed
        if keep:
            assert (target / "a.bin").read_bytes() == published["a.bin"]
            assert not (target / "b.bin").exists()
            names = {p.name for p in target.rglob("*")}
            assert not [n for n in names if n.startswith(".hostd")]  # no scratch left
        else:
            assert not target.exists()
        # An empty target that was there stays, emptied.
        rmtree(target)
        target.mkdir()
        r = Restore(h, target, order=["a.bin"])
        with pytest.raises(HostdError):
            r.wait()
        assert target.is_dir()
        assert os.listdir(target) == []


def test_a_cancelled_restore_takes_back_what_landed(
    work: Path, published: dict[str, bytes]
) -> None:
    target = work / "out"
    with HeldOrigin(work / "origin") as origin, Hostd(work / "d", origin=origin.url) as h:
        origin.hold(first_chunk(published["b.bin"]))
        r = Restore(h, target)
        while r.next_file()["path"] != "a.bin":
            pass
        assert (target / "a.bin").exists()
        r.client.close()  # the caller goes away
        r.thread.join(DEADLINE)
        deadline = time.monotonic() + DEADLINE
        while target.exists():  # the daemon sees the caller gone and takes the files back
            assert time.monotonic() < deadline, sorted(os.listdir(target))
            time.sleep(0.02)


def test_a_file_the_caller_made_under_a_placed_name_is_not_taken_back(
    work: Path, published: dict[str, bytes]
) -> None:
    """The caller removes a file the restore placed and makes its own under that name: ext4
    gives it the inode number just freed, which was all a take-back compared, so a cancel
    removed the caller's file. The ctime placed is compared too. (On an ext4 of few inodes,
    which gives the number just freed to the next file: elsewhere it may not.)"""
    with (
        small_ext4(work, 16 << 20, "-N", "64") as ext,
        HeldOrigin(work / "origin") as origin,
        Hostd(work / "d", origin=origin.url) as h,
    ):
        target = ext / "out"
        # Every other file held: none is made in the target between the unlink and the
        # caller's file, to take the inode number just freed.
        for other in ("b.bin", "w/c.bin", "w/d.bin"):
            origin.hold(first_chunk(published[other]))
        r = Restore(h, target, order=["a.bin"])
        while r.next_file()["path"] != "a.bin":
            pass
        placed = (target / "a.bin").stat()
        (target / "a.bin").unlink()
        (target / "a.bin").write_bytes(b"the caller's own")
        assert (target / "a.bin").stat().st_ino == placed.st_ino  # (what the test is about)
        deadline = time.monotonic() + DEADLINE
        while (target / "a.bin").stat().st_ctime_ns == placed.st_ctime_ns:  # (one clock tick)
            assert time.monotonic() < deadline
            os.utime(target / "a.bin")
        r.client.close()  # the caller goes: the daemon takes back what it placed
        r.thread.join(DEADLINE)
        poll("the restore's files taken back", lambda: not (target / "w").exists())
        assert (target / "a.bin").read_bytes() == b"the caller's own"


def test_progressive_is_refused_where_it_cannot_hold(
    work: Path, published: dict[str, bytes]
) -> None:
    with Hostd(work / "d", origin=f"file://{work}/origin") as h:
        (work / "old").mkdir()
        (work / "old" / "keep").write_text("x")
        body = {"ref": "m/weights", "target": str(work / "old"), "progressive": True}

        def refused(asked: JSON, why: str) -> None:
            status, answer = request(h.socket, "POST", "/v1/restore", asked)
            assert status == 400
            assert why in answer["message"]

        refused({**body, "replace": True}, "cannot replace a tree")
        assert (work / "old" / "keep").read_text() == "x"
        elsewhere = {**body, "target": str(work / "n")}
        refused({**elsewhere, "order": [""]}, "field 'order'")
        refused({**elsewhere, "ranges": True, "mode": "link"}, "field 'ranges'")
        plain = {"ref": "m/weights", "target": str(work / "n")}
        refused({**plain, "keep_partial": True}, "progressive restore only")
        refused({**plain, "ranges": True}, "progressive restore only")
        with Client(h.socket) as c, pytest.raises(UsageError):
            c.restore("m/weights", work / "old", replace=True, progressive=True)


def test_the_cli_prints_each_file_as_it_lands(
    work: Path, published: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    with Hostd(work / "d", origin=f"file://{work}/origin", fetch_concurrency=1) as h:
        sock = ["--socket", str(h.socket)]
        argv = ["restore", "m/weights", str(work / "out"), "--progressive", "--order", "w/*"]
        assert main([*argv, *sock]) == 0
        out = capsys.readouterr().out.splitlines()
        landed = out[: out.index(next(line for line in out if line.startswith("snapshot")))]
        assert landed == ["empty", "w/c.bin", "w/d.bin", "a.bin", "b.bin", "w/to-a"]
        assert (
            main(["restore", "m/weights", str(work / "j"), "--progressive", "--json", *sock]) == 0
        )
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [e.get("event") for e in lines[:-1]] == ["file"] * 6
        assert lines[-2]["symlink"] == "../a.bin"
        assert lines[-1]["progressive"] is True
        # --order and --keep-partial mean nothing without --progressive
        assert main(["restore", "m/weights", str(work / "k"), "--order", "a.bin", *sock]) == 2
        assert "--order and --keep-partial need --progressive" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["copy", "link"])
def test_a_name_taken_in_the_target_fails_the_restore_at_once(
    work: Path, published: dict[str, bytes], mode: str
) -> None:
    """The target is the caller's and visible while it fills: a file made there under a name
    of the snapshot is never overwritten, and the restore fails then, not once the rest of
    the snapshot has been fetched (a link said so as an internal error)."""
    target = work / "out"
    tiers = [{"name": "mem", "path": str(work / "d" / "mem"), "budget": "1GiB"}]
    trusted = {"link_to_writers": True}
    with (
        HeldOrigin(work / "origin") as origin,
        Hostd(work / "d", origin=origin.url, fetch_concurrency=2, tiers=tiers, access=trusted) as h,
    ):
        held_c = origin.hold(first_chunk(published["w/c.bin"]))
        origin.hold(first_chunk(published["b.bin"]))  # held to the end
        r = Restore(h, target, order=["a.bin", "w/c.bin", "b.bin"], keep_partial=True, mode=mode)
        while r.next_file()["path"] != "a.bin":
            pass
        (target / "w" / "c.bin").write_bytes(b"mine")
        held_c.set()
        with pytest.raises(UsageError, match=r"'w/c\.bin' appeared in the target"):
            r.wait()
        assert (target / "w" / "c.bin").read_bytes() == b"mine"
        assert (target / "a.bin").read_bytes() == published["a.bin"]  # kept, as asked
        assert not (target / "b.bin").exists()


def test_a_kept_partial_restore_that_fails_leaves_only_files_it_told(work: Path) -> None:
    """Batches of copies stay out to the helper across the placer's batches: a restore that
    fails with some out (a name taken in the middle of a tree of many small files, a third
    of them cached, the rest arriving) waits for them and tells what they landed, so every
    file left (keep_partial) had its `file` event, and no scratch file is left."""
    src = work / "src"
    names = sorted(f"d{i % 8}/f{i:05d}.txt" for i in range(3000))
    for i, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(f"file {i} ".encode() * 20)
    part = work / "part"  # the same bytes for the first 1000 names: cached beforehand
    for name in names[:1000]:
        (part / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, part / name)
    origin_dir = work / "origin"
    with Hostd(work / "pub", origin=origin_dir.as_uri(), pack_size=0) as pub:
        pub.publish(part, "t/part")
        pub.publish(src, "t/many")
    target = work / "out"
    taken = target / names[2000]
    with (
        HeldOrigin(origin_dir, packs=True) as origin,
        Hostd(work / "d", origin=origin.url) as h,
    ):
        assert h.restore("t/part", work / "warm")["event"] == "result"
        while not origin.asked.empty():
            origin.asked.get()
        origin.gate.clear()

        def meddle() -> None:
            # the rest is being fetched: the target and its directories are made, and the
            # cached files land meanwhile; the caller makes one of the names still to come
            origin.asked.get(timeout=DEADLINE)
            taken.write_bytes(b"mine")
            origin.gate.set()

        t = threading.Thread(target=meddle)
        t.start()
        body = {"ref": "t/many", "target": str(target), "mode": "copy", "progressive": True}
        events = stream(h.socket, "/v1/restore", {**body, "keep_partial": True})
        t.join()
    out = outcome(events)
    assert out["event"] == "error", out
    assert "appeared in the target" in out["message"], out
    told = {e["path"] for e in events if e.get("event") == "file"}
    left = {str(f.relative_to(target)) for f in target.rglob("*") if f.is_file()}
    assert taken.read_bytes() == b"mine"
    assert set(names[:1000]) <= told  # (those cached landed while the rest was held)
    assert left - {names[2000]} == told  # no file without its event, none told and gone
    for name in told:
        assert (target / name).read_bytes() == (src / name).read_bytes()


def test_a_second_progressive_restore_into_the_same_target_is_refused(
    work: Path, published: dict[str, bytes]
) -> None:
    """Two replicas restoring into one shared path: the second is refused while the first
    fills it, and takes nothing of the first's with it."""
    src = work / "one"
    src.mkdir()
    (src / "a.bin").write_bytes(published["a.bin"])  # no empty file: the target stays empty
    with Hostd(
        work / "pub2", origin=f"file://{work}/origin", chunk_size="64KiB", pack_size=0
    ) as pub:
        pub.publish(src, "m/one")
    target = work / "out"
    with (
        HeldOrigin(work / "origin", gated=True) as origin,
        Hostd(work / "d", origin=origin.url) as h,
    ):
        first = Restore(h, target, ref="m/one")
        assert origin.first.wait(DEADLINE)  # the first has made the target and is fetching
        assert os.listdir(target) == []
        second = Restore(h, target, ref="m/one")
        with pytest.raises(TargetExists, match="being filled by another progressive restore"):
            second.wait()
        # one whose tree has directories made none of them there (it used to make them
        # first, and keep_partial kept them, mixed into the other's tree)
        third = Restore(h, target, keep_partial=True)
        with pytest.raises(TargetExists, match="being filled by another progressive restore"):
            third.wait()
        assert os.listdir(target) == []
        origin.gate.set()
        assert first.wait()["files"] == 1
    assert (target / "a.bin").read_bytes() == published["a.bin"]
    assert os.listdir(target) == ["a.bin"]


def test_a_failed_restore_takes_back_only_what_it_placed(
    work: Path, published: dict[str, bytes]
) -> None:
    target = work / "out"
    with (
        HeldOrigin(work / "origin") as origin,
        Hostd(work / "d", origin=origin.url, fetch_concurrency=1, retries=1) as h,
    ):
        held = origin.hold(first_chunk(published["b.bin"]))
        origin.missing.add(first_chunk(published["w/d.bin"]).hex())
        r = Restore(h, target, order=["a.bin", "b.bin", "w/d.bin"])
        while r.next_file()["path"] != "a.bin":
            pass
        (target / "mine.txt").write_text("the caller's own")  # made while it restores
        (target / "w" / "notes").write_text("and in a directory it made")
        held.set()
        with pytest.raises(HostdError, match=r"w/d\.bin"):
            r.wait()
    # the caller's files stay, with the directories that hold them; the rest is gone
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
        "mine.txt",
        "w",
        "w/notes",
    ]


def hidden_builds(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.hostd-*"))


def built_trees(target: Path) -> list[Path]:
    """The trees being built in the hidden builds (renamed onto the target at the commit)."""
    return [b / fsops.BUILD_TREE for b in hidden_builds(target)]


def poll(what: str, check: Any) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Plain(Restore):
    """A restore that is not progressive, on a thread of its own."""

    def _run(self, target: Path, kwargs: dict[str, Any]) -> None:
        try:
            self.result = self.client.restore("m/weights", target, **kwargs)
        except BaseException as e:
            self.error = e


def test_a_cold_copy_restore_writes_files_while_the_rest_is_fetched(
    work: Path, published: dict[str, bytes]
) -> None:
    """Not progressive: the files are copied into the hidden build as their blobs are
    verified, while a held chunk keeps the fetch going; the target appears only whole."""
    target = work / "out"
    with HeldOrigin(work / "origin") as origin, Hostd(work / "d", origin=origin.url) as h:
        held = origin.hold(first_chunk(published["b.bin"]))
        r = Plain(h, target, mode="copy")

        def others_built() -> bool:
            builds = built_trees(target)
            return len(builds) == 1 and all(
                (builds[0] / n).is_file() and (builds[0] / n).read_bytes() == published[n]
                for n in NAMES
                if n != "b.bin"
            )

        poll("the other files in the build", others_built)
        assert not (built_trees(target)[0] / "b.bin").exists()
        assert not target.exists()
        held.set()
        result = r.wait()
        assert "progressive" not in result
        assert (result["copied"], result["linked"]) == (4, 0)
        for n, data in published.items():
            assert (target / n).read_bytes() == data
        assert (target / "b.bin").stat().st_mtime_ns == 1_600_000_000_123_456_789
        assert os.readlink(target / "w" / "to-a") == "../a.bin"
        assert hidden_builds(target) == []


def test_a_failed_cold_restore_leaves_the_old_tree(work: Path, published: dict[str, bytes]) -> None:
    target = work / "out"
    target.mkdir()
    (target / "old").write_bytes(b"old tree")
    with (
        HeldOrigin(work / "origin") as origin,
        Hostd(work / "d", origin=origin.url, fetch_concurrency=1, retries=1) as h,
    ):
        origin.missing.add(first_chunk(published["w/d.bin"]).hex())
        r = Plain(h, target, mode="copy", replace=True)
        with pytest.raises(HostdError, match=r"w/d\.bin"):
            r.wait()
        assert os.listdir(target) == ["old"]
        assert hidden_builds(target) == []
        # The same restore once the chunk is there replaces the tree, whole.
        origin.missing.clear()
        result = Plain(h, target, mode="copy", replace=True).wait()
        assert result["copied"] == 4
        assert sorted(p.name for p in target.iterdir()) == ["a.bin", "b.bin", "empty", "w"]
        assert hidden_builds(target) == []


def test_a_cancelled_cold_restore_removes_its_build(
    work: Path, published: dict[str, bytes]
) -> None:
    target = work / "out"
    with HeldOrigin(work / "origin") as origin, Hostd(work / "d", origin=origin.url) as h:
        origin.hold(first_chunk(published["b.bin"]))
        r = Plain(h, target, mode="copy")
        poll("a.bin in the build", lambda: any((b / "a.bin").exists() for b in built_trees(target)))
        r.client.close()  # the caller goes away
        r.thread.join(DEADLINE)
        poll("the build to go", lambda: not hidden_builds(target))
        assert not target.exists()


def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(p))
    return out


def _helpers(h: Hostd) -> list[int]:
    """The daemon's helper processes (forked by its zygote, hostd.fsops, a child of it)."""
    assert h.proc is not None
    zygotes = [
        p
        for p in _children(h.proc.pid)
        if b"hostd.fsops" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    return [c for z in zygotes for c in _children(z)]


def _kill_the_helper(h: Hostd) -> None:
    """kill -9 of the one helper placing files as the caller (as the OOM killer would)."""
    helpers = _helpers(h)
    assert len(helpers) == 1
    os.kill(helpers[0], 9)


@pytest.mark.parametrize("mode", ["copy", "link"])
def test_a_helper_killed_mid_restore_fails_it_and_what_landed_is_taken_back(
    work: Path, published: dict[str, bytes], mode: str
) -> None:
    """The helper that places files as the caller dies (kill -9, the OOM killer) while a
    progressive restore runs: the restore fails naming what happened, and what had landed
    goes, as after any failure: a new helper, as the caller, takes it back."""
    target = work / "out"
    # link: the target beside the tier, on one filesystem, and root trusted with links
    tiers = [{"name": "mem", "path": str(work / "d" / "mem"), "budget": "1GiB"}]
    trusted = {"link_to_writers": True}
    with (
        HeldOrigin(work / "origin") as origin,
        Hostd(work / "d", origin=origin.url, tiers=tiers, access=trusted) as h,
    ):
        held = origin.hold(first_chunk(published["b.bin"]))
        r = Restore(h, target, mode=mode)
        while r.next_file()["path"] != "a.bin":
            pass
        assert (target / "a.bin").exists()
        if mode == "link":
            assert (target / "a.bin").stat().st_nlink == 2  # the blob's own inode
        _kill_the_helper(h)
        held.set()
        with pytest.raises(HostdError, match="helper"):
            r.wait()
        assert not target.exists(), sorted(os.listdir(target))


def test_a_helper_killed_mid_restore_kept_partial_leaves_no_scratch_file(
    work: Path, published: dict[str, bytes]
) -> None:
    """keep_partial: what landed whole stays when the helper dies, and a file being written
    by range (a scratch name) goes, as after any failure."""
    target = work / "out"
    with HeldOrigin(work / "origin") as origin, Hostd(work / "d", origin=origin.url) as h:
        held = origin.hold(second_chunk(published["b.bin"]))
        r = Restore(h, target, ranges=True, keep_partial=True, order=["a.bin", "b.bin"])
        told: set[str] = set()
        while not {"a.bin", "b.bin"} <= told:
            ev = r.next_file()
            if ev["event"] == "file" or ev["path"] == "b.bin":
                told.add(ev["path"])
        assert scratch(target) != []  # b.bin's, its first chunk written
        _kill_the_helper(h)
        held.set()
        with pytest.raises(HostdError, match="helper"):
            r.wait()
        assert (target / "a.bin").read_bytes() == published["a.bin"]
        assert scratch(target) == []
        assert not (target / "b.bin").exists()


def test_the_daemon_killed_mid_progressive_link_restore_leaves_none_of_its_links(
    work: Path, published: dict[str, bytes]
) -> None:
    """kill -9 of the daemon while a progressive link restore runs: the helper, seeing the
    daemon gone, takes back what landed, the daemon's links among it (it was told of each
    before it was made), and the target the restore made. Nothing else would: the daemon
    that knew of them is gone."""
    target = work / "out"
    tiers = [{"name": "mem", "path": str(work / "d" / "mem"), "budget": "1GiB"}]
    with (
        HeldOrigin(work / "origin") as origin,
        Hostd(work / "d", origin=origin.url, tiers=tiers, access={"link_to_writers": True}) as h,
    ):
        origin.hold(first_chunk(published["b.bin"]))
        r = Restore(h, target, mode="link")
        while r.next_file()["path"] != "a.bin":
            pass
        assert (target / "a.bin").stat().st_nlink == 2  # a link of the daemon's
        helpers = _helpers(h)
        h.kill()
        with pytest.raises(HostdError):
            r.wait()
        poll("the helper to take the tree back", lambda: not target.exists())
        poll("the helper to exit", lambda: not any(Path(f"/proc/{p}").exists() for p in helpers))


def test_a_helper_killed_mid_restore_leaves_no_build_directory(
    work: Path, published: dict[str, bytes]
) -> None:
    """Not progressive: the helper dies while the daemon lives on. The restore fails, and
    a new helper, as the caller, removes the hidden build the dead one was filling (it
    was left for the next restore into that same target to sweep)."""
    target = work / "out"
    with HeldOrigin(work / "origin") as origin, Hostd(work / "d", origin=origin.url) as h:
        held = origin.hold(first_chunk(published["b.bin"]))
        r = Plain(h, target, mode="copy")
        poll("a.bin in the build", lambda: any((b / "a.bin").exists() for b in built_trees(target)))
        _kill_the_helper(h)
        held.set()
        with pytest.raises(HostdError, match="helper"):
            r.wait()
        assert hidden_builds(target) == []
        assert not target.exists()


@pytest.mark.parametrize("meddle", ["link", "write"])
def test_a_part_whose_blob_is_lent_and_moves_while_it_is_copied_in_is_copied_again_hashed(
    tmp_path: Path, meddle: str
) -> None:
    """With ranges, the chunks of a file's blob that no tee wrote are copied into its part
    when the blob completes. If another restore lends the blob meanwhile, linking it (its
    ctime moves), that failed the progressive restore, which is not built again: the part
    is now copied again, each chunk hashed, and lands right. A write through that link
    instead still fails it, naming the file, and none of its bytes are taken for good."""
    from hostd.core import manifest as mf
    from hostd.errors import ChunkCorrupt
    from hostd.materialize import Placer, Ready, Watch, _Part

    cs = 64 * 1024
    data = os.urandom(3 * cs - 100)
    chunks = tuple(
        mf.Chunk(chunk_id(data[i : i + cs]), len(data[i : i + cs])) for i in range(0, len(data), cs)
    )
    entry = mf.FileEntry("w.bin", 0o644, len(data), chunks, 1)
    m = mf.build(chunk_size=cs, files=[entry])
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    calls = []

    def lent() -> bool:  # asked before the copy, then after it: lent by then, and moved
        calls.append(1)
        if len(calls) == 2:
            if meddle == "link":
                os.link(blob, tmp_path / "a-link")
            else:
                with open(blob, "r+b") as f:
                    f.write(b"EVIL")
        return len(calls) >= 2

    placer = Placer.__new__(Placer)  # (only what _fill_part reads)
    placer.m = m
    placer.watch = Watch(lent=lambda _d: lent())
    part_path = tmp_path / "part"
    fd = os.open(part_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        part = _Part(entry, "part", fd, os.getuid())
        part.written.add(cs)  # (the tee wrote the middle chunk)
        os.pwrite(fd, data[cs : 2 * cs], cs)
        ready = Ready(entry.digest, str(blob), lent, None)
        if meddle == "link":
            placer._fill_part(ready, part)
            assert part_path.read_bytes() == data
        else:
            with pytest.raises(ChunkCorrupt, match=r"'w\.bin': a lent blob's chunk 0 changed"):
                placer._fill_part(ready, part)
    finally:
        os.close(fd)
    assert len(calls) == 2


@pytest.mark.parametrize("what", ["file", "ranged", "symlink"])
def test_a_scratch_name_someone_took_in_the_target_is_named_in_the_error(
    work: Path, what: str
) -> None:
    """The target is the caller's, visible while it fills: a name the helper was about to
    make its scratch file (or symlink) under, taken by someone else meanwhile, fails the
    batch with an error that names it, as a file's own name taken does, not a bare errno.
    (The helper in process: which scratch name comes next is its to know.)"""
    ours, theirs = socket.socketpair()
    helper = fsops.Helper(ours)
    helper.root = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        target = work / "out"
        helper.op_target({"path": str(target), "replace": False}, [])
        helper.op_begin({"progressive": True, "dirs": ["d"], "want": []}, [])
        scratch = f"{fsops.PART_PREFIX}{helper.parts}"
        (target / "d" / scratch).write_bytes(b"mine")
        op: Callable[[], object] = {
            "file": lambda: helper.op_files({"items": [["d/f", 0o644, 0, "empty", None]]}, []),
            "ranged": lambda: helper.op_parts({"paths": ["d/f"]}, []),
            "symlink": lambda: helper.op_symlinks({"items": [["d/l", "f"]]}, []),
        }[what]
        with pytest.raises(fsops.Refused, match=rf"'d/{scratch}' appeared in the tree being built"):
            op()
        assert (target / "d" / scratch).read_bytes() == b"mine"
        assert sorted(os.listdir(target / "d")) == [scratch]  # nothing of ours left
    finally:
        helper.abort()
        os.close(helper.root)
        ours.close()
        theirs.close()
