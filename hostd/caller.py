"""Who is at the other end of the local socket: pid, uid, gid and groups, taken at connect.

SO_PEERCRED gives the pid, uid and gid the peer had when it connected (translated into our
namespaces); SO_PEERGROUPS (Linux 4.13+, option 59, which Python has no constant for) gives
its supplementary groups. Both describe the connecting process at connect time, so a caller
that drops or gains rights later is still judged by what it had then.

What a caller may do is decided in access.py; what is done for it on the filesystem runs
with exactly these credentials (asuser.py).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import struct
import time
from dataclasses import dataclass

from hostd.fileio import libc

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_NGROUPS_MAX = 65536


@dataclass(frozen=True, slots=True)
class Caller:
    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"Caller(pid={self.pid}, uid={self.uid}, gid={self.gid}, groups={self.groups})"

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "groups": list(self.groups)}


def peer_caller(sock: socket.socket) -> Caller:
    """The credentials of the process that connected `sock` (a Unix stream socket)."""
    return Caller(*peer_creds(sock), _peer_groups(sock))


def peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """SO_PEERCRED of a Unix stream socket: (pid, uid, gid) of the process that connected."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("iII", raw)  # uid_t and gid_t are unsigned
    return int(pid), int(uid), int(gid)


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    # Through libc, not socket.getsockopt: that one refuses a buffer over 1024 bytes (256
    # groups), and a caller in more groups would be one no route could tell.
    n = 64
    while True:
        groups = (ctypes.c_uint32 * n)()
        size = ctypes.c_uint32(ctypes.sizeof(groups))
        fd = sock.fileno()
        if libc.getsockopt(fd, socket.SOL_SOCKET, SO_PEERGROUPS, groups, ctypes.byref(size)) == 0:
            return tuple(groups[: size.value // 4])
        err = ctypes.get_errno()
        # ERANGE: the buffer is too small; the kernel said in `size` how big it must be.
        if err == errno.ERANGE and n < _NGROUPS_MAX:
            n = min(_NGROUPS_MAX, max(4 * n, size.value // 4))
            continue
        if err in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):  # a kernel before 4.13
            return ()
        raise OSError(err, os.strerror(err))


def daemon_caller() -> Caller:
    """The daemon itself, as a caller (in-process work that no socket client asked for)."""
    return Caller(os.getpid(), os.geteuid(), os.getegid(), tuple(os.getgroups()))


def could_write_cache(caller: Caller, daemon_uid: int, pidfd: int = -1) -> bool:
    """Whether `caller` could write to a file the daemon owns, read-only bit or not: root, the
    daemon's own uid, a process holding CAP_DAC_OVERRIDE or CAP_FOWNER (effective, permitted
    or ambient), or one whose uid another process holding them runs as, or a process in a
    user namespace (told apart by its inode, not its map's text) that maps either uid: its
    capabilities there apply to their files. Such callers must not get the cache's own
    inodes by link. `pidfd` (of the caller) confirms the /proc entries read were its own.
    When in doubt, yes. Blocking (a /proc scan): run it on a thread."""
    if caller.uid in (0, daemon_uid):
        return True
    try:
        statuses = _task_statuses(str(caller.pid))  # (each thread's: its credentials)
        if not statuses:
            return True  # gone, or not to be read: in doubt
        status = "\n".join(statuses)
        same_ns = _ns(f"/proc/{caller.pid}/ns/user") == _ns("/proc/self/ns/user")
        with open(f"/proc/{caller.pid}/uid_map") as f:
            theirs = f.read()
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, 0)  # still the process that connected
    except OSError:
        return True
    if _write_caps(status):
        return True
    if same_ns:
        # our own user namespace: its uid is all it has, unless another of that uid's
        # processes holds the capabilities (the caller's links are that uid's files)
        return _uid_holds_write_caps(caller.uid)
    for line in theirs.splitlines():
        # inside, outside (as seen from our namespace), count
        parts = line.split()
        if len(parts) != 3:
            return True
        outside, count = int(parts[1]), int(parts[2])
        if any(outside <= u < outside + count for u in (0, daemon_uid)):
            return True
    return False


_WRITE_CAPS = (1 << 1) | (1 << 3)  # CAP_DAC_OVERRIDE, CAP_FOWNER
# Permitted ones count as held: a process raises a permitted capability into its effective
# set whenever it likes (capset), and ambient ones survive its execs.
_CAP_SETS = ("CapEff:", "CapPrm:", "CapAmb:")


def _write_caps(status: str) -> bool:
    """Whether a process's /proc status shows CAP_DAC_OVERRIDE or CAP_FOWNER held."""
    return any(
        line.startswith(_CAP_SETS) and int(line.split()[1], 16) & _WRITE_CAPS
        for line in status.splitlines()
    )


def _uid_holds_write_caps(uid: int) -> bool:
    """Whether any process in our user namespace that runs as `uid` (real, effective, saved
    or filesystem uid) holds CAP_DAC_OVERRIDE or CAP_FOWNER: it could write through a blob
    linked into that uid's tree. Blocking: a /proc scan, a few ms a thousand processes.

    One seen holding them is looked at again, HOLD_CHECKS times HOLD_PAUSE apart: a process
    that is taking `uid` holds root's capabilities for the moment between its setresuid and
    its exec (setpriv; a container runtime's init, which keeps them through the change to
    apply the container's own), and once it has let them go it cannot take them back. What
    matters is who holds them once the links exist; one that holds them on is a writer."""
    # Every process, at every look: a holder can hand its capabilities on to a fresh pid
    # (fork, then exit) between two looks, and only the pids of the first would be missed.
    for _ in range(HOLD_CHECKS):
        if not _holding(uid):
            return False
        _pause(HOLD_PAUSE)
    return bool(_holding(uid))


HOLD_CHECKS = 3
HOLD_PAUSE = 0.01  # seconds
_pause = time.sleep


def _holding(uid: int) -> list[str]:
    """The processes in our user namespace one of whose threads runs as `uid` and holds a
    write capability; one whose namespace cannot be read counts (when in doubt).
    Credentials are per thread, and /proc/PID/status shows the thread-group leader's only:
    a leader that let its capabilities go may have a thread that holds them on."""
    ours = _ns("/proc/self/ns/user")
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for status in _task_statuses(pid):
            uids = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("Uid:")), [])
            if str(uid) in uids and _write_caps(status):
                break
        else:
            continue
        try:
            if _ns(f"/proc/{pid}/ns/user") == ours:
                out.append(pid)
        except OSError:
            out.append(pid)  # when in doubt, yes
    return out


def _task_statuses(pid: str) -> list[str]:
    """The /proc status of each thread of process `pid` (none where it is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                out.append(f.read())
        except OSError:
            continue  # (a thread gone meanwhile)
    return out


NS_GET_PARENT = 0xB702  # _IO(0xb7, 0x2): the parent of a user namespace, as a new fd
NS_GET_OWNER_UID = 0xB704  # _IO(0xb7, 0x4): the uid that made a user namespace


GONE = -1  # quota_uid of a caller whose process had exited: all such share their caps


def quota_uid(pid: int, uid: int, daemon_uid: int, pidfd: int = -1) -> int:
    """The uid whose caps a caller's operations and connections count against: its own,
    unless it runs in a user namespace that an unprivileged user made (a rootless container,
    `unshare -r`): then that user's, whose subordinate uids (/etc/subuid) would otherwise
    each bring caps of their own. A namespace that root or the daemon's user made (a
    runtime's per-container or per-pod ranges) keeps its uids apart. GONE where the process
    that connected has exited (a child that connected and handed its socket on: its own uid
    could be any of the subordinate ones); its own uid where nothing else can be told (pid 0:
    another pid namespace's). `pidfd` (SO_PEERPIDFD) confirms the namespace read was the
    caller's: once it has exited, its pid may name any later process, whose namespace says
    nothing of the caller. A few system calls: fine on the loop."""
    try:
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return GONE if pid > 0 else uid
    except OSError:
        return uid
    if pidfd >= 0 and not _alive(pidfd):  # (alive after the open: the namespace was its own)
        os.close(fd)
        return GONE
    try:
        ours = _ns("/proc/self/ns/user")
        while True:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == ours:
                return uid  # our own namespace
            try:
                parent = fcntl.ioctl(fd, NS_GET_PARENT)
            except OSError:
                return uid  # (EPERM: not below ours)
            pst = os.fstat(parent)
            if (pst.st_dev, pst.st_ino) == ours:  # fd is the one our namespace holds
                os.close(parent)
                raw = fcntl.ioctl(fd, NS_GET_OWNER_UID, bytes(4))
                owner = int(struct.unpack("I", raw)[0])
                return uid if owner in (0, daemon_uid) else owner
            os.close(fd)
            fd = parent
    except OSError:
        return uid
    finally:
        os.close(fd)


def _alive(pidfd: int) -> bool:
    """Whether the process `pidfd` names has not exited (signal 0: nothing is sent)."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # (there, but not ours to signal: a daemon that is not root)
    return True


def _ns(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def peer_pidfd(sock: socket.socket) -> int:
    """A pidfd of the process that connected `sock` (SO_PEERPIDFD, Linux 6.5+), or -1. Unlike
    the pid, it can never name a later process that reuses the number."""
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError:
        return -1
