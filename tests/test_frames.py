"""Frames between the daemon and its helper (hostd/frames.py). The helper runs as the
caller, who can make it say anything: whatever it sends, the daemon gets a FrameError and
keeps none of the descriptors that came with a frame it refused."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import struct
from pathlib import Path

import pytest

from hostd import frames


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_frame_and_more_descriptors_than_one_message_carries_arrive_whole(
    tmp_path: Path,
) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sent = [os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC) for _ in range(frames.MAX_FDS + 7)]
    body = {"op": "x", "paths": [f"d/f{i:06d}" for i in range(50_000)]}  # ~0.6 MB: many reads
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # (it fills the socket's buffer)
            sending = pool.submit(frames.send_frame, a, body, sent)
            got = frames.recv_frame(b)
            sending.result()
        assert got is not None
        obj, fds = got
        assert obj == {**body, "nfds": len(sent)}
        assert [os.fstat(fd).st_ino for fd in fds] == [os.fstat(fd).st_ino for fd in sent]
        for fd in fds:
            os.close(fd)
        frames.send_frame(a, {})
        assert frames.recv_frame(b) == ({"nfds": 0}, [])
        a.close()
        assert frames.recv_frame(b) is None  # (EOF between frames)
    finally:
        for fd in sent:
            os.close(fd)
        b.close()


@pytest.mark.parametrize(
    ("how", "body", "length"),
    [
        ("cut short", b'{"a":', 100),
        ("not JSON", b"nope", 4),
        ("not an object", b"[1]", 3),
        ("over the limit", b"", frames.MAX_FRAME + 1),
        ("a count that is not one", b'{"nfds": "7"}', 13),
        ("more descriptors than come", b'{"nfds": 9}', 11),
    ],
)
def test_a_broken_frame_leaves_none_of_its_descriptors_open(
    tmp_path: Path, how: str, body: bytes, length: int
) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC) for _ in range(5)]
    a.sendmsg(
        [struct.pack(">I", length) + body],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))],
    )
    for fd in fds:
        os.close(fd)
    a.close()  # (what was sent is in flight: none of our descriptors)
    before = _open_fds()
    with pytest.raises(frames.FrameError):
        frames.recv_frame(b)
    assert _open_fds() == before, how
    b.close()
