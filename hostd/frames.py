"""Frames between the daemon and its helper (fsops.py): a 4-byte length, a JSON object, and
descriptors attached with SCM_RIGHTS. Standard library only (the helper imports it).

Descriptors ride on the sendmsg of a frame's first bytes; the receiver reads each frame's
4-byte header with recvmsg, which a Unix stream socket never merges with the bytes of
another frame that carries descriptors. Past MAX_FDS descriptors, empty frames carry the
rest, and `nfds` in the object says how many to wait for.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

MAX_FDS = 250  # per frame; the kernel's SCM_MAX_FD is 253
MAX_FRAME = 64 << 20


class FrameError(Exception):
    """The other end broke the protocol or went away mid-frame."""


def send_frame(
    sock: socket.socket, obj: dict[str, Any], fds: list[int] | tuple[int, ...] = ()
) -> None:
    """One frame; past MAX_FDS descriptors, empty frames carry the rest (`nfds` says how
    many the receiver is to wait for)."""
    data = json.dumps({**obj, "nfds": len(fds)}, separators=(",", ":")).encode()
    frame = struct.pack(">I", len(data)) + data
    for i in range(0, max(len(fds), 1), MAX_FDS):
        part = list(fds[i : i + MAX_FDS])
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(part)}i", *part))]
        if i == 0:
            sent = sock.sendmsg([frame], anc if part else [])
            _send_rest(sock, frame, sent)
        else:  # more descriptors than one message carries: empty frames bring the rest
            empty = struct.pack(">I", 0)
            _send_rest(sock, empty, sock.sendmsg([empty], anc))


def _send_rest(sock: socket.socket, frame: bytes, sent: int) -> None:
    if sent < len(frame):
        sock.sendall(frame[sent:])


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One frame and every descriptor sent with it. None at EOF."""
    fds: list[int] = []
    header = _recv_with_fds(sock, 4, fds)
    if header is None:
        return None
    try:
        (length,) = struct.unpack(">I", header)
        if length > MAX_FRAME:
            raise FrameError(f"frame of {length} bytes is over the limit")
        body = _recv_exact(sock, length) if length else b""
        try:
            obj = json.loads(body) if body else {}
        except ValueError as e:
            raise FrameError(f"a frame is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise FrameError("a frame is not a JSON object")
        nfds = obj.get("nfds", 0)
        if type(nfds) is not int or not 0 <= nfds <= 1 << 20:
            raise FrameError(f"a frame's nfds {nfds!r} is not a count")
        while len(fds) < nfds:  # the rest come with empty frames
            if _recv_with_fds(sock, 4, fds) is None:
                raise FrameError("the other end closed the socket mid-frame")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return obj, fds


def _recv_with_fds(sock: socket.socket, n: int, fds: list[int]) -> bytes | None:
    data, anc, flags, _ = sock.recvmsg(n, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) - len(raw) % 4]))
    if flags & socket.MSG_CTRUNC:  # descriptors dropped (out of them?): the frame is useless
        for fd in fds:
            os.close(fd)
        raise FrameError("descriptors sent with a frame were lost (MSG_CTRUNC)")
    if not data:
        return None
    if len(data) < n:
        data += _recv_exact(sock, n - len(data))
    return data


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    """`n` bytes, received into one buffer of that size: a scan's answer of 100,000 files is
    ~10 MB, which `recv` took a piece at a time, each into a new buffer of all that was left,
    then joined and copied (a quarter slower, the same peak)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise FrameError("the other end closed the socket mid-frame")
        got += k
    view.release()
    return buf
