"""hostd.leases against the real kernel: what breaks a read lease and what does not."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostd.leases import SIGNAL, Busy, Leases

KEY = (b"\x01" * 32, "mem")


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    p = tmp_path / "blob"
    p.write_bytes(b"x" * 4096)
    p.chmod(0o444)
    os.link(p, tmp_path / "link")  # a restored tree's name for it
    return p


@pytest.fixture
def heard() -> Iterator[list[int]]:
    """The lease-break signals this process got (it holds the leases)."""
    got: list[int] = []
    old = signal.signal(SIGNAL, lambda *_: got.append(1))
    try:
        yield got
    finally:
        signal.signal(SIGNAL, old)


@contextlib.contextmanager
def open_for_writing(path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Another process opening `path` for writing (it waits while a lease holds); killed,
    if still there, on the way out."""
    code = f"import os; os.close(os.open({str(path)!r}, os.O_WRONLY)); print('opened', flush=True)"
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        yield writer
    finally:
        writer.kill()
        writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()


def wait(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def vouched(leases: Leases, key: tuple[bytes, str], blob: Path) -> int:
    """A lease taken on `blob` for `key` and vouched for (its caller checked the blob):
    its number."""
    got = leases.take(key, str(blob))
    assert got is not None
    leases.vouch(key, got[1])
    return got[1]


def test_an_open_for_writing_through_another_name_breaks_the_lease(
    blob: Path, heard: list[int]
) -> None:
    leases = Leases()
    got = leases.take(KEY, str(blob))
    assert got is not None
    assert got[1] > 0  # new: its number
    assert got[0] is not None
    assert got[0][3] == blob.stat().st_ino  # (its fstat_fds tuple)
    leases.vouch(KEY, got[1])
    assert leases.holds(KEY)
    with open_for_writing(blob.with_name("link")) as writer:
        wait(lambda: heard)  # told by the signal; the writer waits for the lease to go
        assert writer.poll() is None
        assert not leases.holds(KEY)  # breaking: no longer a lease that holds
        assert leases.scan() == [KEY]  # given up: the writer goes on
        assert writer.wait(10) == 0
        assert writer.stdout is not None
        assert writer.stdout.read() == b"opened\n"
    assert len(leases) == 0
    assert leases.broken == 1


def test_links_and_unlinks_do_not_break_it(blob: Path, heard: list[int]) -> None:
    leases = Leases()
    vouched(leases, KEY, blob)
    os.unlink(blob.with_name("link"))  # a client's rm of its tree
    os.link(blob, blob.with_name("again"))  # another restore's link
    os.stat(blob)
    assert leases.holds(KEY)
    assert not heard
    assert leases.scan() == []
    got = leases.take(KEY, str(blob))
    assert got is not None
    assert got == (None, 0)  # the one held is kept
    leases.close()
    assert len(leases) == 0


def test_a_file_open_for_writing_takes_no_lease(blob: Path) -> None:
    leases = Leases()
    fd = os.open(blob, os.O_RDWR)
    try:
        with pytest.raises(Busy, match="open for writing"):
            leases.take(KEY, str(blob))
    finally:
        os.close(fd)
    assert len(leases) == 0
    assert leases.take(KEY, str(blob)) is not None


def test_past_its_most_none_is_taken(blob: Path, tmp_path: Path) -> None:
    leases = Leases(most=1)
    assert leases.take(KEY, str(blob)) is not None
    other = tmp_path / "other"
    other.write_bytes(b"y")
    assert leases.take((b"\x02" * 32, "mem"), str(other)) is None  # (the caller lends it)
    leases.release(KEY)
    assert leases.take((b"\x02" * 32, "mem"), str(other)) is not None


def test_closed_leases_take_none(blob: Path) -> None:
    leases = Leases()
    assert leases.take(KEY, str(blob)) is not None
    leases.close()
    assert len(leases) == 0
    assert leases.take(KEY, str(blob)) is None


def test_a_break_is_recorded_before_its_writer_goes_on_and_forgotten_breaks_count_as_all(
    blob: Path, heard: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy that began before a break asks `broken_since` with the count it read then:
    the break is recorded before the lease is given up, so before the writer can write. The
    inode the lease is on is told apart from another (a refetched blob's). Past BREAKS_KEPT
    breaks, a count older than the newest forgotten break takes every blob as broken."""
    leases = Leases()
    since = leases.broken
    number = vouched(leases, KEY, blob)
    st = blob.stat()
    assert leases.holds_on(KEY, st.st_dev, st.st_ino) == (
        number,
        (st.st_size, st.st_mtime_ns, st.st_ctime_ns),  # (the inode's state at the take)
    )
    assert leases.holds_on(KEY, st.st_dev, st.st_ino + 1) is None
    never = (b"\x02" * 32, "mem")
    assert leases.holding([KEY, never]) == [True, False]
    with open_for_writing(blob.with_name("link")) as writer:
        wait(lambda: heard)
        assert leases.broken_since(since, [KEY[0], b"\x02" * 32]) == set()  # not given up yet
        assert leases.holds_on(KEY, st.st_dev, st.st_ino) is None  # (breaking)
        assert leases.holding([KEY, never]) == [False, False]
        leases.scan()
        assert writer.wait(10) == 0
    assert leases.broken_since(since, [KEY[0], b"\x02" * 32]) == {KEY[0]}
    assert leases.broken_since(leases.broken, [KEY[0]]) == set()  # (a copy begun after)

    monkeypatch.setattr("hostd.leases.BREAKS_KEPT", 2)
    now = leases.broken
    for i in range(3):  # three more breaks, each of another blob: the oldest is forgotten
        key = (bytes([0x10 + i]) * 32, "mem")
        vouched(leases, key, blob)
        with open_for_writing(blob) as w:
            wait(lambda key=key: not leases.holds(key))
            leases.scan()
            assert w.wait(10) == 0
    other = b"\x03" * 32  # never broken
    assert leases.broken_since(now, [other]) == {other}  # (a break since may be forgotten)
    assert leases.broken_since(now + 1, [other, b"\x12" * 32]) == {b"\x12" * 32}


def test_take_many_answers_as_take_does_for_each(tmp_path: Path) -> None:
    """A batch of takes in one native call: a new lease's stat and number, Busy for a file
    open for writing, None past `most`, and the one held already kept (None, 0) once
    vouched for."""
    files = [tmp_path / n for n in ("a", "busy", "c", "d")]
    for f in files:
        f.write_bytes(b"x")
    keys = [(bytes([i]) * 32, "mem") for i in range(4)]
    writing = os.open(files[1], os.O_WRONLY)
    leases = Leases(3)
    try:
        got = leases.take_many([(k, str(f)) for k, f in zip(keys, files, strict=True)])
        assert isinstance(got[1], Busy)
        assert isinstance(got[3], tuple)  # (busy took no room: a lease each for a, c and d)
        for i in (0, 2):
            answer = got[i]
            assert isinstance(answer, tuple)
            st, number = answer
            assert st is not None
            assert st[3] == files[i].stat().st_ino
            assert number > 0
            assert not leases.holds(keys[i])  # (not vouched for yet)
            leases.vouch(keys[i], number)
            assert leases.holds(keys[i])
        assert leases.take_many([(keys[0], str(files[0]))]) == [(None, 0)]
        leases.release(keys[3])
        twice = leases.take_many([(keys[3], str(files[3]))] * 2)  # (room for one more)
        assert isinstance(twice[0], tuple)
        assert twice[1] == (twice[0][0], twice[0][1])  # the same lease, not vouched yet
        assert len(leases) == 3  # one descriptor for it, not two
    finally:
        os.close(writing)
        leases.close()


def test_take_many_past_most_takes_what_take_would_in_turn(tmp_path: Path) -> None:
    """A batch member that takes no lease (open for writing: Busy; not there) uses no room:
    the member past `most` that `take` in turn would hold a lease on gets one too, not
    None (a blob linked with none is ctime-checked at every use, re-hashed after an rm)."""
    files = [tmp_path / n for n in ("a", "busy", "gone", "d", "e")]
    for f in files:
        if f.name != "gone":
            f.write_bytes(b"x")
    keys = [(bytes([i]) * 32, "mem") for i in range(len(files))]
    items = [(k, str(f)) for k, f in zip(keys, files, strict=True)]
    writing = os.open(files[1], os.O_WRONLY)
    one, many = Leases(3), Leases(3)
    try:
        want: list[object] = []
        for key, path in items:
            try:
                r = one.take(key, path)
                want.append(None if r is None else "lease")
            except Exception as e:
                want.append(type(e))
        got = [
            None if r is None else type(r) if isinstance(r, Exception) else "lease"
            for r in many.take_many(items)
        ]
        assert got == want == ["lease", Busy, FileNotFoundError, "lease", "lease"]
        assert len(many) == len(one) == 3
    finally:
        os.close(writing)
        one.close()
        many.close()
