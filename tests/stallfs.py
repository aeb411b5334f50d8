"""A tiny in-memory FUSE filesystem whose server never answers a write: a caller's filesystem
that blocks whoever writes into it, for as long as its server likes. With `--answer-writes`,
an ordinary one that keeps what is written.

    python tests/stallfs.py MOUNTPOINT USER LOG [--answer-writes]

Mounted as setuid `fusermount3` mounts for an ordinary user on a stock distro: root opens
/dev/fuse and calls mount(2) for a mountpoint the user owns, with that user's user_id and
group_id; from then on the server runs as the user alone. Every request but WRITE is
answered (enough for mkdir, create, rename, stat and readdir); each WRITE is logged to LOG
("WRITE") and left unanswered, so the writer waits in the kernel until the server exits.
It speaks the kernel's FUSE protocol (7.31) itself: no library. Ends when unmounted.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import stat
import struct
import sys
import time
from typing import Any, TextIO

MS_NOSUID, MS_NODEV = 2, 4
INIT, LOOKUP, FORGET, GETATTR, SETATTR, MKDIR, UNLINK, RMDIR, RENAME = 26, 1, 2, 3, 4, 9, 10, 11, 12
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC, FLUSH, OPENDIR, READDIR = (
    14,
    15,
    16,
    17,
    18,
    20,
    25,
    27,
    28,
)
RELEASEDIR, FSYNCDIR, ACCESS, CREATE, INTERRUPT, DESTROY = 29, 30, 34, 35, 36, 38
BATCH_FORGET, READDIRPLUS, RENAME2 = 42, 44, 45
READLINK, SYMLINK = 5, 6


class StallFS:
    def __init__(self, fd: int, uid: int, gid: int, log: TextIO, stall: bool = True) -> None:
        self.fd = fd
        self.log = log
        self.stall = stall
        self.now = int(time.time())
        root: dict[str, Any] = {"mode": stat.S_IFDIR | 0o755, "uid": uid, "gid": gid}
        self.nodes: dict[int, dict[str, Any]] = {1: {**root, "size": 0, "kids": {}, "nlink": 2}}
        self.next_id = 2

    def attr(self, i: int) -> bytes:
        n = self.nodes[i]
        t = self.now
        return struct.pack(
            "<QQQQQQIIIIIIIIII",
            i, n["size"], (n["size"] + 511) // 512, t, t, t, 0, 0, 0,
            n["mode"], n["nlink"], n["uid"], n["gid"], 0, 4096, 0,
        )  # fmt: skip

    def entry(self, i: int) -> bytes:
        return struct.pack("<QQQQII", i, 0, 1, 1, 0, 0) + self.attr(i)

    def reply(self, unique: int, err: int = 0, data: bytes = b"") -> None:
        os.write(self.fd, struct.pack("<IiQ", 16 + len(data), -err, unique) + data)

    def make(self, parent: int, name: str, mode: int, uid: int, gid: int) -> int:
        i = self.next_id
        self.next_id += 1
        node: dict[str, Any] = {"mode": mode, "uid": uid, "gid": gid, "size": 0}
        node["nlink"] = 2 if stat.S_ISDIR(mode) else 1
        if stat.S_ISDIR(mode):
            node["kids"] = {}
        self.nodes[i] = node
        self.nodes[parent]["kids"][name] = i
        return i

    def serve(self) -> None:
        writes = 0
        while True:
            try:
                buf = os.read(self.fd, 1 << 21)
            except OSError as e:
                if e.errno == errno.ENODEV:  # unmounted
                    return
                if e.errno == errno.EINTR:
                    continue
                raise
            length, op, unique, nid, uid, gid, _pid = struct.unpack_from("<IIQQIII", buf)
            body = buf[40:length]
            if op == WRITE and self.stall:
                writes += 1
                self.log.write(f"WRITE #{writes} from uid {uid}: left unanswered\n")
                self.log.flush()
                continue
            if op in (FORGET, BATCH_FORGET, INTERRUPT):
                continue
            if op == DESTROY:
                return
            try:
                self.answer(op, unique, nid, uid, gid, body)
            except Exception as e:  # a request this toy does not understand
                self.log.write(f"op {op}: {e!r}\n")
                self.reply(unique, errno.EIO)

    def answer(self, op: int, unique: int, nid: int, uid: int, gid: int, body: bytes) -> None:
        n = self.nodes.get(nid)
        if op == INIT:
            _major, _minor, readahead, _flags = struct.unpack_from("<IIII", body)
            init = struct.pack(
                "<IIIIHHIIHHII", 7, 31, readahead, 0, 16, 12, 1 << 20, 1, 256, 0, 0, 0
            )
            self.reply(unique, 0, init + b"\0" * 24)
        elif n is None:
            self.reply(unique, errno.ENOENT)
        elif op == LOOKUP:
            kid = n.get("kids", {}).get(_name(body))
            self.reply(unique, errno.ENOENT) if kid is None else self.reply(
                unique, 0, self.entry(kid)
            )
        elif op in (GETATTR, SETATTR):
            if op == SETATTR:
                valid = struct.unpack_from("<I", body)[0]
                if valid & 8:
                    n["size"] = struct.unpack_from("<Q", body, 16)[0]
                    del n.setdefault("data", bytearray())[n["size"] :]
                if valid & 1:
                    mode = struct.unpack_from("<I", body, 68)[0]
                    n["mode"] = (n["mode"] & ~0o7777) | (mode & 0o7777)
            self.reply(unique, 0, struct.pack("<QII", 1, 0, 0) + self.attr(nid))
        elif op in (MKDIR, CREATE):
            at = 8 if op == MKDIR else 16
            mode = struct.unpack_from("<II" if op == MKDIR else "<IIII", body)[
                0 if op == MKDIR else 1
            ]
            name = _name(body[at:])
            if name in n["kids"]:
                self.reply(unique, errno.EEXIST)
                return
            kind = stat.S_IFDIR if op == MKDIR else stat.S_IFREG
            i = self.make(nid, name, kind | (mode & 0o7777), uid, gid)
            extra = b"" if op == MKDIR else struct.pack("<QII", i, 0, 0)
            self.reply(unique, 0, self.entry(i) + extra)
        elif op == SYMLINK:
            link_name, link_to = body.split(b"\0")[:2]
            if _name(link_name) in n["kids"]:
                self.reply(unique, errno.EEXIST)
                return
            i = self.make(nid, _name(link_name), stat.S_IFLNK | 0o777, uid, gid)
            self.nodes[i]["data"] = bytearray(link_to)
            self.nodes[i]["size"] = len(link_to)
            self.reply(unique, 0, self.entry(i))
        elif op == READLINK:
            self.reply(unique, 0, bytes(n.get("data", b"")))
        elif op in (OPEN, OPENDIR):
            self.reply(unique, 0, struct.pack("<QII", nid, 0, 0))
        elif op in (READDIR, READDIRPLUS):
            _fh, offset, size = struct.unpack_from("<QQI", body)
            entries = [(".", nid, 4), ("..", 1, 4)] + [
                (k, v, 4 if stat.S_ISDIR(self.nodes[v]["mode"]) else 8)
                for k, v in n["kids"].items()
            ]
            out = b""
            for index, (name, ino, kind) in enumerate(entries):
                if index < offset:
                    continue
                raw = name.encode()
                rec = struct.pack("<QQII", ino, index + 1, len(raw), kind) + raw
                rec += b"\0" * (-len(rec) % 8)
                if len(out) + len(rec) > size:
                    break
                out += rec
            self.reply(unique, 0, out)
        elif op in (RELEASE, RELEASEDIR, FLUSH, FSYNC, FSYNCDIR, ACCESS):
            self.reply(unique)
        elif op == READ:
            _fh, offset, size = struct.unpack_from("<QQI", body)
            data = n.setdefault("data", bytearray())
            data.extend(b"\0" * (n["size"] - len(data)))
            self.reply(unique, 0, bytes(data[offset : min(offset + size, n["size"])]))
        elif op == WRITE:  # (answered: --answer-writes)
            _fh, offset, size = struct.unpack_from("<QQI", body)
            data = n.setdefault("data", bytearray())
            data.extend(b"\0" * (max(n["size"], offset) - len(data)))
            data[offset : offset + size] = body[40 : 40 + size]
            n["size"] = max(n["size"], offset + size)
            self.reply(unique, 0, struct.pack("<II", size, 0))
        elif op in (UNLINK, RMDIR):
            gone = n["kids"].pop(_name(body), None)
            self.reply(unique, errno.ENOENT if gone is None else 0)
        elif op in (RENAME, RENAME2):
            new_dir = struct.unpack_from("<Q", body)[0]
            old, new = (body[8:] if op == RENAME else body[16:]).split(b"\0")[:2]
            kid = n["kids"].pop(old.decode(), None)
            if kid is None:
                self.reply(unique, errno.ENOENT)
            else:
                self.nodes[new_dir]["kids"][new.decode()] = kid
                self.reply(unique)
        elif op == STATFS:
            fs = struct.pack("<QQQQQIII", 1 << 20, 1 << 19, 1 << 19, 1000, 900, 4096, 255, 4096)
            self.reply(unique, 0, fs + b"\0" * 28)
        else:
            self.log.write(f"op {op}: not implemented\n")
            self.log.flush()
            self.reply(unique, errno.ENOSYS)


def _name(body: bytes) -> str:
    return body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def main(argv: list[str]) -> int:
    stall = "--answer-writes" not in argv
    mountpoint, user, log_path = [a for a in argv if a != "--answer-writes"]
    pw = pwd.getpwnam(user)
    if os.stat(mountpoint).st_uid != pw.pw_uid:
        print(f"{mountpoint} is not {user}'s: fusermount mounts only there", file=sys.stderr)
        return 2
    fd = os.open("/dev/fuse", os.O_RDWR)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"fd={fd},rootmode=40000,user_id={pw.pw_uid},group_id={pw.pw_gid}".encode()
    if libc.mount(b"stallfs", mountpoint.encode(), b"fuse.stallfs", MS_NOSUID | MS_NODEV, options):
        print(f"mount: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    log = open(log_path, "a")  # noqa: SIM115 - (opened as root: the test's to read)
    # from here on the user's own process, as after fusermount hands it the descriptor
    os.setgroups([])
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    with log:
        log.write("mounted\n")
        log.flush()
        StallFS(fd, pw.pw_uid, pw.pw_gid, log, stall).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
