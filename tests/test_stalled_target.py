"""A caller's own filesystem that never answers a write (a FUSE server of its own, which any
user may mount through fusermount on a stock distro) stalls that caller's restore alone:
the daemon keeps serving everyone else, and it still stops when told to.

The filesystem is real: tests/stallfs.py speaks the kernel's FUSE protocol and leaves each
WRITE unanswered, so the writer waits in the kernel as it would on a hung network mount."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Hostd, NotifyListener, make_tree, rmtree, short_tmp, tree_digest

pytestmark = pytest.mark.root

HERE = Path(__file__).resolve().parent
NOBODY = pwd.getpwnam("nobody")
DEADLINE = 60.0


def wait_for(what: str, check: object, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def unmount(path: Path) -> None:
    """Detach a mount (umount2 MNT_DETACH: umount(8) would stat it first, which root may not
    do on a FUSE mount of another user's)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(str(path).encode(), 2)


AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


def nobody_post(socket: Path, path: str, body: dict[str, Any]) -> list[str]:
    """The command that POSTs `body` to `path` on the daemon's socket, as nobody (curl: its
    output is the answer's stream)."""
    return [
        *AS_NOBODY,
        *("curl", "-sN", "--unix-socket", str(socket), "-X", "POST"),
        *("-H", "Content-Type: application/json", "--data-binary", json.dumps(body)),
        f"http://hostd{path}",
    ]


class StalledMount:
    """nobody's FUSE mount at `work`/fuse, whose server never answers a write, until `stop`
    (not `stall`: an ordinary filesystem of nobody's)."""

    def __init__(self, work: Path, stall: bool = True) -> None:
        self.path = work / "fuse"
        self.path.mkdir()
        os.chown(self.path, NOBODY.pw_uid, NOBODY.pw_gid)
        self.log = work / "stallfs.log"
        server = [sys.executable, str(HERE / "stallfs.py"), str(self.path), "nobody"]
        self.server = subprocess.Popen(
            [*server, str(self.log), *([] if stall else ["--answer-writes"])]
        )
        # (root may not stat a FUSE mount of nobody's: its server says when it is up)
        wait_for("the FUSE mount", lambda: "mounted" in self.text())

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self) -> None:
        """The server gone (the writes waiting on it fail), the mount detached."""
        self.server.kill()
        self.server.wait()
        unmount(self.path)


@contextlib.contextmanager
def stalled_mount(work: Path, stall: bool = True) -> Iterator[StalledMount]:
    mount = StalledMount(work, stall)
    try:
        yield mount
    finally:
        mount.stop()


@pytest.fixture
def work() -> Iterator[Path]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse (a FUSE filesystem of the caller's)")
    root = short_tmp("st")
    root.chmod(0o755)  # nobody reaches its mountpoint and the socket
    try:
        yield root
    finally:
        unmount(root / "fuse")
        rmtree(root)


def test_a_caller_whose_filesystem_never_answers_a_write_stalls_its_own_restore_alone(
    work: Path,
) -> None:
    """With `ranges`, the daemon writes each verified chunk into the caller's file itself.
    Those writes ran on the event loop's shared threads: into a file on a filesystem that
    never answers, each one took a thread for good, and once they were all taken every
    other restore and /metrics waited with them, and the cancelled restore kept its slot.
    Now they run on a thread of that restore's own, which is left behind when it is
    cancelled."""
    rng = random.Random(5)
    big, other = work / "big", work / "other"
    big.mkdir()
    other.mkdir()
    (big / "weights.bin").write_bytes(rng.randbytes(4 << 20))  # 64 chunks of 64 KiB
    (other / "w.bin").write_bytes(rng.randbytes(1 << 20))
    origin = f"file://{work}/origin"
    with Hostd(work / "pub", origin=origin) as pub:
        pub.publish(big, "m/big", chunk_size=65536)
        pub.publish(other, "m/other", chunk_size=65536)
    client: subprocess.Popen[bytes] | None = None
    # (the mount's server goes first on the way out: a write stuck on it holds the daemon)
    with Hostd(work / "d", origin=origin, socket_mode="0666") as d, stalled_mount(work) as mount:
        try:
            body = {
                "ref": "m/big",
                "target": str(mount.path / "t"),
                "progressive": True,
                "ranges": True,
                "mode": "copy",
            }
            client = subprocess.Popen(
                nobody_post(d.socket, "/v1/restore", body), stdout=subprocess.DEVNULL
            )
            wait_for("a write into the caller's file", lambda: "WRITE" in mount.text())
            # everyone else is served meanwhile: a cold restore, the metrics
            started = time.monotonic()
            out = d.restore("m/other", work / "out")
            assert out["event"] == "result", out
            assert tree_digest(work / "out") == tree_digest(other)
            assert "hostd_operations_total" in d.metrics()
            assert time.monotonic() - started < DEADLINE
        finally:
            # the stalled caller goes away: its restore is cancelled, its slot given back
            if client is not None:
                client.kill()
                client.wait()

        def in_flight() -> int:
            _, status = d.api("GET", "/v1/status")
            return int(status["in_flight"])

        wait_for("the stalled restore to be counted out", lambda: in_flight() == 0)
        out = d.restore("m/other", work / "out2")  # and its slot is free for others
        assert out["event"] == "result", out
        # Once the server is gone the write fails, and the daemon stops as ever. (Not
        # before: a FUSE request the server has read is waited out by the kernel even
        # through SIGKILL, so a process with such a write cannot end until it is answered.)
        mount.stop()
        assert d.proc is not None
        d.proc.terminate()
        try:
            d.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"hostd did not stop:\n{d.log()[-4000:]}") from None
        assert d.proc.returncode == 0, d.log()


def test_a_source_hostd_cannot_read_is_named_in_a_clear_error(work: Path) -> None:
    """A caller publishing from its own FUSE mount (without allow_other, the default, the
    kernel refuses every other uid, root's included): the publish failed with a bare
    500 'internal' (a small file) or blamed hostd's own tier (a larger one)."""
    access = {"publish": ["user:nobody"]}
    origin = f"file://{work}/origin"
    with (
        Hostd(work / "d", origin=origin, socket_mode="0666", access=access) as d,
        stalled_mount(work) as mount,
    ):
        for name, size in (("small", "1M"), ("large", "8M")):
            src = mount.path / name
            subprocess.run([*AS_NOBODY, "mkdir", str(src)], check=True)
            subprocess.run([*AS_NOBODY, "truncate", "-s", size, str(src / "w.bin")], check=True)
            command = nobody_post(d.socket, "/v1/publish", {"path": str(src), "ref": f"m/{name}"})
            got = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            last = json.loads(got.strip().splitlines()[-1])
            assert last.get("error") == "bad_request", last
            assert "w.bin" in last["message"], last
            assert "allow_other" in last["message"], last


# What a tree holds, as its owner reads it (root may not read a FUSE mount of nobody's): each
# entry's kind, and a file's bytes and exec bit, or a symlink's target.
DIGEST = r"""
import hashlib, json, os, stat, sys
root, out = sys.argv[1], {}
for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
        p = os.path.join(dirpath, name)
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            out[os.path.relpath(p, root)] = ["link", os.readlink(p)]
        elif stat.S_ISDIR(st.st_mode):
            out[os.path.relpath(p, root)] = ["dir"]
        else:
            data = open(p, "rb").read()
            out[os.path.relpath(p, root)] = [hashlib.sha256(data).hexdigest(), st.st_mode & 0o111]
print(json.dumps(out, sort_keys=True))
"""


@pytest.mark.parametrize("progressive", [False, True], ids=["whole", "progressive"])
def test_a_target_hostd_cannot_stat_takes_copies(work: Path, progressive: bool) -> None:
    """A caller restoring onto its own FUSE mount (without allow_other the kernel refuses the
    daemon even a stat through a descriptor the helper opened there): `copy` worked, but
    `auto`, which checks the directories it might link into, failed with a bare 'Permission
    denied'. Nothing can be linked there (another filesystem than every tier's): the helper
    copies it all, and the result says so (none 'copied for mtime')."""
    src = make_tree(work / "src")
    for dirpath, _, _ in os.walk(src):
        os.chmod(dirpath, 0o755)
    origin = f"file://{work}/origin"
    with Hostd(work / "pub", origin=origin) as pub:
        pub.publish(src, "m/t", chunk_size=65536)
    want = subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", DIGEST, str(src)], capture_output=True, text=True
    )
    assert want.returncode == 0, want.stderr
    with (
        Hostd(work / "d", origin=origin, socket_mode="0666") as d,
        stalled_mount(work, stall=False) as mount,
    ):
        for i, mode in enumerate(("auto", "copy", "auto")):  # cold, then warm
            target = f"{mount.path}/{i}-{mode}"
            body = {"ref": "m/t", "target": target, "mode": mode, "progressive": progressive}
            got = subprocess.run(
                nobody_post(d.socket, "/v1/restore", body), capture_output=True, text=True
            )
            last = json.loads(got.stdout.strip().splitlines()[-1])
            assert last.get("event") == "result", last
            assert last["linked"] == 0
            # every file is a copy there: none for its mtime (a blob of two files, each
            # with its own mtime, counted one)
            assert last["copied_for_mtime"] == 0
            tree = subprocess.run(
                [*AS_NOBODY, sys.executable, "-c", DIGEST, target], capture_output=True, text=True
            )
            assert tree.returncode == 0, tree.stderr
            assert json.loads(tree.stdout) == json.loads(want.stdout)
        # and `link` says why it cannot
        body = {"ref": "m/t", "target": f"{mount.path}/link", "mode": "link"}
        got = subprocess.run(
            nobody_post(d.socket, "/v1/restore", body), capture_output=True, text=True
        )
        last = json.loads(got.stdout.strip().splitlines()[-1])
        assert last.get("error") == "bad_request", last
        assert "a hard link cannot cross filesystems" in last["message"]


def test_a_daemon_held_by_a_callers_write_gives_up_the_cache_as_it_stops(work: Path) -> None:
    """The kernel waits out a FUSE write its server has read, through SIGKILL, and a process
    keeps its descriptors until its last thread ends. A stop with such a write took the
    drain, then 20s for the cancelled restore, then 5s for the threads: past the unit's
    TimeoutStopSec (45s), so systemd's SIGKILL came first and left a process holding the
    cache's locks, its socket and its ports, and no daemon could start on that cache (a
    restart, an upgrade) until that caller's server answered. The daemon asks systemd for
    the time it needs, and closes every descriptor before it exits past the stuck thread."""
    rng = random.Random(6)
    big, other = work / "big", work / "other"
    big.mkdir()
    other.mkdir()
    (big / "weights.bin").write_bytes(rng.randbytes(4 << 20))
    (other / "w.bin").write_bytes(rng.randbytes(1 << 20))
    origin = f"file://{work}/origin"
    with Hostd(work / "pub", origin=origin) as pub:
        pub.publish(big, "m/big", chunk_size=65536)
        pub.publish(other, "m/other", chunk_size=65536)
    listener = NotifyListener(work / "notify")
    old = Hostd(
        work / "d",
        origin=origin,
        socket_mode="0666",
        drain_timeout="1s",
        env={"NOTIFY_SOCKET": str(listener.path)},
    )
    with stalled_mount(work) as mount:
        old.start()
        try:
            listener.expect("READY=1")
            body = {"ref": "m/big", "target": str(mount.path / "t"), "progressive": True,
                    "ranges": True, "mode": "copy"}  # fmt: skip
            client = subprocess.Popen(
                nobody_post(old.socket, "/v1/restore", body), stdout=subprocess.DEVNULL
            )
            wait_for("a write into the caller's file", lambda: "WRITE" in mount.text())
            assert old.proc is not None
            old.proc.terminate()
            listener.expect("STOPPING=1")
            extend = listener.expect("EXTEND_TIMEOUT_USEC=")[-1]
            # the drain, the cancelled restore's 2 x 10s and the threads' 5s, with room
            assert int(extend.split("=")[1]) >= (1 + 20 + 5) * 1_000_000
            wait_for("the daemon to give up", lambda: "exiting past" in old.log())
            # it cannot end while the write is held, but it holds nothing of the cache's
            lingering = Path(f"/proc/{old.proc.pid}/task")
            assert old.proc.poll() is None
            for tid in os.listdir(lingering):
                with contextlib.suppress(FileNotFoundError):
                    assert set(os.listdir(lingering / tid / "fd")) <= {"0", "1", "2"}
            with Hostd(work / "d", origin=origin) as new:  # the same cache, socket and tiers
                out = new.restore("m/other", work / "out")
                assert out["event"] == "result", out
                assert tree_digest(work / "out") == tree_digest(other)
            client.kill()
            client.wait()
        finally:
            mount.stop()  # the write fails; the old daemon's last thread ends
            old.close()
            listener.close()
    assert old.proc.returncode == 0, old.log()
