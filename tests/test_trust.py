"""A root daemon acts only with its caller's rights, in its caller's mount namespace.

Each test drives a real daemon running as root over its real socket, as an attacker would:
from an unprivileged account (`setpriv --reuid nobody`, with curl as the client), racing the
daemon with a second process where a race is the attack, or from a client in a mount
namespace of its own. Each is one of issue 9's reproductions, which succeeded before the
helper process (hostd/fsops.py) did the caller's filesystem work.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import os
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from harness import (
    HeldOrigin,
    Hostd,
    make_tree,
    outcome,
    rmtree,
    short_tmp,
    small_ext4,
    stream,
    tree_digest,
)
from test_e2e import sample

import hostd.asuser
from hostd import frames, fsops
from hostd.asuser import AsUser, Spawner
from hostd.caller import Caller
from hostd.core import manifest as mf
from hostd.core.ids import chunk_id
from hostd.errors import ChunkCorrupt, HostdError, TransientError, UsageError
from hostd.materialize import Cancelled, Placer, Watch, materialize
from hostd.publish import _sources

NOBODY = 65534
JSON = "Content-Type: application/json"
CURL = ("curl", "-sSN", "-X", "POST", "-H", JSON, "--unix-socket")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acts as other users: needs root")


@pytest.fixture
def work() -> Iterator[Path]:
    """A scratch directory that other users can reach (the socket and test trees live here)."""
    root = short_tmp("tr")
    root.chmod(0o755)
    try:
        yield root
    finally:
        rmtree(root)


def daemon(work: Path, **config: Any) -> Hostd:
    access = {"publish": [f"uid:{NOBODY}"], **config.pop("access", {})}
    return Hostd(work / "d", socket_mode="0666", access=access, **config)


def as_nobody(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kw)


def curl_stream(sock: Path, path: str, body: dict[str, Any], *prefix: str) -> dict[str, Any]:
    """POST a long operation with curl, run under `prefix` (e.g. setpriv ... as nobody);
    return its final event."""
    cmd = [
        *prefix,
        "curl",
        "-sSN",
        "--unix-socket",
        str(sock),
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        "@-",
        f"http://hostd{path}",
    ]
    out = subprocess.run(
        cmd, input=json.dumps(body), capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    if len(lines) == 1 and "event" not in lines[0]:
        return {"event": "error", **lines[0]}  # an answer before the stream (403, 400...)
    return outcome(lines)


NOBODY_PREFIX = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


def nobody_stream(sock: Path, path: str, body: dict[str, Any]) -> dict[str, Any]:
    return curl_stream(sock, path, body, *NOBODY_PREFIX)


def in_own_mount_namespace(script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script as a client in a mount namespace of its own (as root)."""
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def nobody_dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    os.chown(p, NOBODY, NOBODY)
    return p


def world_readable_tree(p: Path) -> Path:
    make_tree(p)
    for dirpath, _, filenames in os.walk(p):
        os.chmod(dirpath, 0o755)
        for n in filenames:
            q = os.path.join(dirpath, n)
            if not os.path.islink(q):
                os.chmod(q, os.stat(q).st_mode | 0o444)
    return p


def snapshot_of(p: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """What an attack must leave untouched: every entry's owner, mode and bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(p):
        for n in [".", *dirnames, *filenames]:
            q = os.path.join(dirpath, n)
            st = os.lstat(q)
            data = Path(q).read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[os.path.relpath(q, p)] = (st.st_uid, st.st_gid, st.st_mode, data)
    return out


# -- 1. publish reads with the caller's rights ------------------------------------------------


def test_a_daemon_run_as_root_holds_no_cap_sys_resource(work: Path) -> None:
    """The daemon writes verified chunks into callers' files (a progressive restore's
    ranges): with CAP_SYS_RESOURCE those writes took a full filesystem's blocks reserved for
    root, where the caller's own write failed with ENOSPC, and would pass its quota. The
    unit leaves it out; a daemon started as root anywhere else gives it up."""
    mine = next(
        int(line.split()[1], 16)
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("CapEff:")
    )
    if not mine & (1 << 24):
        pytest.skip("this root holds no CAP_SYS_RESOURCE to give up (its bounding set)")
    with Hostd(work / "d") as h:
        assert h.proc is not None
        status = Path(f"/proc/{h.proc.pid}/status").read_text()
        caps = {
            k: int(v, 16)
            for k, v in (
                line.split(":\t")
                for line in status.splitlines()
                if line.startswith(("CapEff", "CapPrm"))
            )
        }
        assert caps["CapEff"] & (1 << 24) == 0
        assert caps["CapPrm"] & (1 << 24) == 0
        assert caps["CapEff"] & (1 << 19)  # (CAP_SYS_PTRACE, which it needs, is kept)
        assert h.api("GET", "/v1/status")[0] == 200


def test_a_range_written_for_a_caller_is_the_callers_write(work: Path) -> None:
    """ext4 keeps blocks for root (resuid): nobody's filesystem is full for nobody. A
    progressive restore with ranges writes nobody's file from the daemon, which is root: it
    took the reserve and landed a file nobody could not have written. Written as nobody's
    (setfsuid), it fails as nobody's own copy does, and the reserve stays."""
    src = work / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(640 * 1024))  # 10 chunks of 64 KiB
    with small_ext4(work, 32 << 20, "-m", "50") as ext:
        (ext / "t").mkdir()  # nobody's empty target: it needs no block of its own
        os.chown(ext / "t", NOBODY, NOBODY)
        os.chown(ext, NOBODY, NOBODY)
        fill = as_nobody("dd", "if=/dev/zero", f"of={ext}/fill", "bs=64k")
        assert "No space left" in fill.stderr  # full, for nobody
        reserved = os.statvfs(ext).f_bfree
        assert reserved * os.statvfs(ext).f_frsize > 8 << 20  # root's reserve is there
        origin = f"file://{work}/origin"
        with Hostd(work / "pub", origin=origin, chunk_size="64KiB", pack_size=0) as pub:
            pub.publish(src, "m/w")
        with daemon(work, origin=origin) as h:  # cold: the file is written by range
            body = {"ref": "m/w", "target": str(ext / "t"), "mode": "copy",
                    "progressive": True, "ranges": True}  # fmt: skip
            end = nobody_stream(h.socket, "/v1/restore", body)
        assert end["event"] == "error", end
        assert end["message"] == "writing 'w.bin' in the target: [Errno 28] No space left on device"
        assert os.statvfs(ext).f_bfree == reserved
        assert os.listdir(ext / "t") == []


def test_publish_cannot_read_what_the_caller_cannot(work: Path) -> None:
    secret = work / "secret"
    secret.write_bytes(b"root only\n")
    secret.chmod(0o600)
    src = world_readable_tree(work / "src")
    os.symlink(str(secret), src / "leak")
    with daemon(work) as d:
        out = nobody_stream(d.socket, "/v1/publish", {"path": str(src), "ref": "t/leak"})
        assert out["event"] == "error", out
        assert "leak" in out["message"], out
        assert "permission denied" in out["message"], out
        # nothing was stored: no blob holds the secret's bytes
        for tier in ("mem", "disk"):
            for dirpath, _, files in os.walk(work / "d" / tier):
                for n in files:
                    assert b"root only" not in Path(dirpath, n).read_bytes()
        out = nobody_stream(d.socket, "/v1/publish", {"path": "/etc", "ref": "t/etc"})
        assert out["event"] == "error", out
        # the same tree without the link publishes fine as nobody
        (src / "leak").unlink()
        out = nobody_stream(d.socket, "/v1/publish", {"path": str(src), "ref": "t/ok"})
        assert out["event"] == "result", out


def test_publish_skips_special_files_without_opening_them(work: Path) -> None:
    src = world_readable_tree(work / "src")
    os.mkfifo(src / "pipe")
    with daemon(work) as d:
        t0 = time.monotonic()
        out = nobody_stream(d.socket, "/v1/publish", {"path": str(src), "ref": "t/fifo"})
        assert out["event"] == "result", out  # skipped, with a warning: never opened
        assert out["skipped"] == [{"path": "pipe", "kind": "FIFO"}], out
        assert time.monotonic() - t0 < 30
        (src / "pipe").unlink()
        assert (
            nobody_stream(d.socket, "/v1/publish", {"path": str(src), "ref": "t/x"})["event"]
            == "result"
        )
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0
        assert time.monotonic() - t0 < 30


def test_a_file_swapped_for_a_fifo_after_the_scan_is_never_opened(work: Path) -> None:
    """The race of item 6, made deterministic at the helper: scan, swap, open."""
    src = world_readable_tree(work / "src")
    sleeper = subprocess.Popen([*NOBODY_PREFIX, "sleep", "60"])
    try:
        caller = Caller(sleeper.pid, NOBODY, NOBODY, ())
        wait_for(lambda: _uid_of(sleeper.pid) == NOBODY)
        spawner = Spawner()
        fs = AsUser.start(caller, spawner)
        try:
            fs.source(str(src))
            f = next(x for x in _sources(fs.scan()["files"]) if x.path == "weights.bin")
            (src / "weights.bin").unlink()
            os.mkfifo(src / "weights.bin", 0o666)
            t0 = time.monotonic()
            with pytest.raises(UsageError, match="changed"):
                fs.open_file(f.path, f.ident, f.via)
            assert time.monotonic() - t0 < 10  # refused, not blocked in open()
            # a symlink swapped in is not followed either
            (src / "weights.bin").unlink()
            os.symlink("/etc/passwd", src / "weights.bin")
            with pytest.raises(UsageError, match="changed"):
                fs.open_file(f.path, f.ident, f.via)
        finally:
            fs.close()
            spawner.close()
    finally:
        sleeper.kill()
        sleeper.wait()


def _uid_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


def wait_for(cond: Any, timeout: float = 20.0, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(step)


# -- 2. restore writes with the caller's rights -----------------------------------------------


def test_restore_lands_only_where_the_caller_could_write(work: Path) -> None:
    src = world_readable_tree(work / "src")
    private = work / "private"
    private.mkdir(mode=0o700)
    victim = work / "victim"
    victim.mkdir()
    (victim / "precious").write_text("root's\n")
    victim.chmod(0o755)
    before = snapshot_of(victim)
    with daemon(work) as d:
        d.publish(src, "t/tree")
        out = nobody_stream(
            d.socket, "/v1/restore", {"ref": "t/tree", "target": f"{private}/x", "mode": "copy"}
        )
        assert out["event"] == "error", out
        assert "permission denied" in out["message"].lower(), out
        assert list(private.iterdir()) == []
        out = nobody_stream(
            d.socket,
            "/v1/restore",
            {"ref": "t/tree", "target": str(victim), "mode": "copy", "replace": True},
        )
        assert out["event"] == "error", out
        assert snapshot_of(victim) == before
        # where nobody may write, the tree lands, owned by nobody, modes exact
        home = nobody_dir(work / "home")
        out = nobody_stream(
            d.socket, "/v1/restore", {"ref": "t/tree", "target": f"{home}/out", "mode": "copy"}
        )
        assert out["event"] == "result", out
        assert tree_digest(home / "out") == tree_digest(src)
        for dirpath, dirnames, filenames in os.walk(home / "out"):
            for n in [".", *dirnames, *filenames]:
                assert os.lstat(os.path.join(dirpath, n)).st_uid == NOBODY
        assert (home / "out" / "run.sh").stat().st_mode & 0o777 == 0o755


# -- 3. a caller racing renames and symlinks redirects nothing --------------------------------

RACER = r"""
import os, sys, time
parent, victim, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
won = 0
while time.monotonic() < deadline:
    for n in os.listdir(parent):
        if n.startswith(".out.hostd-"):
            try:
                os.rename(os.path.join(parent, n), os.path.join(parent, f".stolen-{won}"))
                os.symlink(victim, os.path.join(parent, n))
                won += 1
            except OSError:
                pass
print(won)
"""


def test_racing_the_build_directory_redirects_no_write(work: Path) -> None:
    src = work / "src"
    src.mkdir()
    for i in range(300):
        (src / f"f{i:03}").write_bytes(os.urandom(64) + bytes([i % 256]))
    world_readable_tree(src)
    victim = work / "victim"
    victim.mkdir(mode=0o755)
    (victim / "precious").write_text("root's\n")
    before = snapshot_of(victim)
    home = nobody_dir(work / "home")
    with daemon(work) as d:
        d.publish(src, "t/many")
        racer = subprocess.Popen(
            [*NOBODY_PREFIX, sys.executable, "-c", RACER, str(home), str(victim), "60"],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(15):
                nobody_stream(
                    d.socket,
                    "/v1/restore",
                    {"ref": "t/many", "target": f"{home}/out", "mode": "copy"},
                )
                if (home / "out").is_symlink():
                    (home / "out").unlink()
                shutil.rmtree(home / "out", ignore_errors=True)
        finally:
            racer.terminate()
            racer.wait(30)
    assert snapshot_of(victim) == before


# Takes flock's exclusive lock on a directory, as any user who may open it can, and holds it
# until its stdin closes; says "refused" where it may not open the directory.
LOCKER = r"""
import fcntl, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
except PermissionError:
    print("refused", flush=True)
    sys.exit()
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


def lock_as_nobody(path: Path) -> tuple[subprocess.Popen[str], str]:
    """A process of nobody's that locks directory `path` (flock), and what it said."""
    locker = subprocess.Popen(
        [*NOBODY_PREFIX, sys.executable, "-c", LOCKER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdout is not None
    return locker, locker.stdout.readline().strip()


def test_another_users_lock_on_a_target_keeps_no_progressive_restore_out(work: Path) -> None:
    """An empty target in a place others may read: while nobody held flock's lock on it,
    every progressive restore into it was refused as 'being filled by another progressive
    restore' (the helper locked the target to keep a second restore out). The daemon keeps
    that count itself now; a second restore is still refused."""
    src = world_readable_tree(work / "src")
    target = work / "shared"
    target.mkdir(mode=0o755)
    with daemon(work) as d:
        d.publish(src, "t/tree")
        locker, said = lock_as_nobody(target)
        try:
            assert said == "held"
            # nor may a user who can read it but not write in it hold it (a progressive
            # restore of its own would have, for as long as its fetch took)
            body = {"ref": "t/tree", "target": str(target), "progressive": True}
            out = nobody_stream(d.socket, "/v1/restore", body)
            assert out["error"] == "forbidden", out
            assert "cannot write in target" in out["message"], out
            out = d.restore("t/tree", target, progressive=True, mode="copy")
            assert out["event"] == "result", out
        finally:
            locker.communicate(timeout=30)
    assert tree_digest(target) == tree_digest(src)


def published_file(work: Path, name: str, size: int, ref: str) -> tuple[Path, Path]:
    """A tree of one file of `size` random bytes, published as `ref` in 64 KiB chunks, each
    an object of its own (no packs: HeldOrigin holds chunk GETs) to a file:// origin in
    `work`: the tree and the origin's directory."""
    src, origin_dir = work / "src", work / "origin"
    src.mkdir()
    (src / name).write_bytes(os.urandom(size))
    with Hostd(work / "pub", origin=f"file://{origin_dir}", chunk_size="64KiB", pack_size=0) as pub:
        pub.publish(src, ref)
    return src, origin_dir


def test_another_user_cannot_lock_a_tree_being_built(work: Path) -> None:
    """A restore builds the tree in a hidden directory beside the target and locks it there
    (a sweep by another restore leaves a locked build alone). Made 0755, anyone could open it
    between its mkdir and that lock and take the lock first: the helper then waited on it.
    It is the caller's alone until it is whole."""
    src, origin_dir = published_file(work, "a.bin", 100_000, "t/a")
    with (
        HeldOrigin(origin_dir, gated=True) as origin,
        daemon(work, origin=origin.url) as d,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        done = pool.submit(d.restore, "t/a", work / "out", mode="copy")
        assert origin.first.wait(60)  # fetching: the build is there
        builds = list(work.glob(".out.hostd-*"))
        assert len(builds) == 1
        locker, said = lock_as_nobody(builds[0])
        locker.communicate(timeout=30)
        assert said == "refused"
        origin.gate.set()
        assert done.result(120)["event"] == "result"
    assert stat.S_IMODE((work / "out").stat().st_mode) == 0o755
    assert tree_digest(work / "out") == tree_digest(src)
    assert not list(work.glob(".out.hostd-*"))


def test_a_build_moved_away_takes_nothing_else_with_it(work: Path) -> None:
    """In a group's shared directory (2775, not sticky) a member may rename what the others
    make. B moved A's build away while A's restore fetched and gave A's own directory the
    build's name: A's commit refused ('moved away'), and the abort removed, by that name and
    with A's rights, A's files, which B could not remove itself. The build is emptied
    through its descriptor and removed by name only while the name is still it."""
    a, b, group = 12001, 12002, 5001
    as_a = ("setpriv", f"--reuid={a}", f"--regid={group}", f"--groups={group}")
    as_b = ("setpriv", f"--reuid={b}", f"--regid={group}", f"--groups={group}")
    _, origin_dir = published_file(work, "model.bin", 200_000, "t/m")
    shared = work / "shared"
    shared.mkdir()
    os.chown(shared, 0, group)
    shared.chmod(0o2775)
    mine = shared / "A_data"  # A's own work
    (mine / "run1").mkdir(parents=True)
    (mine / "run1" / "results.txt").write_text("A's results\n")
    for p in (mine, mine / "run1", mine / "run1" / "results.txt"):
        os.chown(p, a, group)
    denied = subprocess.run([*as_b, "rm", "-rf", str(mine / "run1")], capture_output=True)
    assert denied.returncode != 0  # B may not remove them
    with (
        HeldOrigin(origin_dir, gated=True) as origin,
        daemon(work, origin=origin.url) as d,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        body = {"ref": "t/m", "target": str(shared / "model"), "mode": "copy"}
        done = pool.submit(curl_stream, d.socket, "/v1/restore", body, *as_a)
        assert origin.first.wait(60)  # the build is there, its fetch held
        (build,) = [n for n in os.listdir(shared) if n.startswith(".model.hostd-")]
        swap = f"cd {shared} && mv {build} moved && mv A_data {build}"
        subprocess.run([*as_b, "sh", "-c", swap], check=True)
        origin.gate.set()
        out = done.result(120)
        assert out["event"] == "error", out
        assert "was moved away" in out["message"], out
    assert (shared / build / "run1" / "results.txt").read_text() == "A's results\n"
    assert os.listdir(shared / "moved") == []  # the build itself, emptied


def test_a_read_only_target_says_so(work: Path) -> None:
    """The check that a caller may write in an existing progressive target said 'permission
    denied' (as 'forbidden') on a read-only mount, root's included; a write there says
    'Read-only file system', as it does for a target the restore makes."""
    src = work / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    ro = work / "ro"
    (ro / "empty").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        with daemon(work) as d:
            d.publish(src, "t/a")
            for name in ("empty", "new"):
                out = d.restore("t/a", ro / name, progressive=True)
                assert out["event"] == "error", out
                assert "Read-only file system" in out["message"], out
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def default_acl(path: Path, other: int) -> None:
    """A default ACL on directory `path`: user::rwx group::r-x other::`other` (what setfacl -d
    sets: system.posix_acl_default, version 2)."""
    entries = [(0x01, 7), (0x04, 5), (0x20, other)]
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, 0xFFFFFFFF) for t, p in entries)
    os.setxattr(path, "system.posix_acl_default", acl)


@pytest.mark.parametrize("parent", ["setgid", "default ACL"])
def test_a_restored_tree_gets_what_a_directory_made_there_gets(work: Path, parent: str) -> None:
    """The build is the caller's alone while it is built (0700): the tree's top directory
    was then chmod'ed 0755 at the commit, which dropped the setgid bit of a group's shared
    directory and widened a default ACL's 0750 to 0755 (every user could list the tree and
    read the files linked into it). It is made inside the build now, as it would be beside
    the target, and renamed out."""
    src = work / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("a\n")
    (src / "b.bin").write_bytes(b"b" * 1000)
    shared = work / "shared"
    shared.mkdir()
    if parent == "setgid":
        os.chown(shared, 0, NOBODY)
        shared.chmod(0o2775)
    else:
        default_acl(shared, other=0)
    made = shared / "made"
    made.mkdir(0o755)  # the reference: a directory made there
    (shared / "replaced").mkdir()
    with daemon(work) as d:
        d.publish(src, "t/tree")
        out = d.restore("t/tree", shared / "plain", mode="copy")
        assert out["event"] == "result", out
        out = d.restore("t/tree", shared / "replaced", mode="copy", replace=True)
        assert out["event"] == "result", out
    want = (made.stat().st_mode, made.stat().st_gid)
    assert want[0] & (stat.S_ISGID if parent == "setgid" else 0o007) == (
        stat.S_ISGID if parent == "setgid" else 0
    )
    for name in ("plain", "replaced"):
        got = (shared / name).stat()
        assert (stat.filemode(got.st_mode), got.st_gid) == (stat.filemode(want[0]), want[1])
        assert tree_digest(shared / name) == tree_digest(src)
    assert sorted(p.name for p in shared.iterdir()) == ["made", "plain", "replaced"]


# -- 12. no restore or publish aims at hostd's own storage ------------------------------------


def test_storage_is_off_limits_whatever_the_spelling(work: Path) -> None:
    src = world_readable_tree(work / "src")
    with daemon(work) as d:
        d.publish(src, "t/tree")
        mem = work / "d" / "mem"
        origin = work / "d" / "origin"
        os.symlink(str(work / "d"), work / "alias")
        for target in (mem, origin, work / "alias" / "disk", mem / "blobs", work / "d"):
            out = curl_stream(
                d.socket,
                "/v1/restore",
                {"ref": "t/tree", "target": str(target), "mode": "copy", "replace": True},
            )
            assert out["event"] == "error", (target, out)
            assert "hostd's own storage" in out["message"], out
        out = curl_stream(d.socket, "/v1/publish", {"path": str(mem), "ref": "t/mem"})
        assert out["event"] == "error", out
        assert "hostd's own storage" in out["message"], out
        out = curl_stream(d.socket, "/v1/publish", {"path": str(work), "ref": "t/all"})
        assert out["event"] == "error", out
        assert "hostd's own storage" in out["message"], out
        # a bind mount of a directory below a tier, in a client's own mount namespace
        (work / "bm").mkdir()
        body = json.dumps({"ref": "t/tree", "target": f"{work}/bm/x", "mode": "copy"})
        script = (
            f"mount --bind {mem}/blobs {work}/bm && "
            f"curl -sSN --unix-socket {d.socket} -X POST -H '{JSON}' -d '{body}' "
            "http://hostd/v1/restore"
        )
        got = in_own_mount_namespace(script)
        last = json.loads(got.stdout.splitlines()[-1])
        assert "error" in last, last  # refused before streaming: its own status and body
        assert "hostd's own storage" in last["message"], last
        # the tiers and the origin still hold everything: a restore elsewhere works
        out = d.restore("t/tree", work / "fine", mode="copy")
        assert out["event"] == "result", out
        assert tree_digest(work / "fine") == tree_digest(src)


# -- 13. paths are the caller's: its mount namespace ------------------------------------------


def test_a_client_in_its_own_mount_namespace_gets_its_own_paths(work: Path) -> None:
    src = world_readable_tree(work / "src")
    models = work / "models"
    models.mkdir()
    (models / "only-on-host").mkdir()
    with daemon(work) as d:
        d.publish(src, "t/tree")
        body = json.dumps({"ref": "t/tree", "target": f"{models}/llama", "mode": "auto"})
        missing = json.dumps({"ref": "t/tree", "target": f"{models}/only-on-host/x"})
        script = (
            f"mount -t tmpfs none {models} && "
            f"curl -sSN --unix-socket {d.socket} -X POST -H '{JSON}' -d '{body}' "
            "http://hostd/v1/restore && "
            f"echo ==== && find {models}/llama -type f | sort && echo ==== && "
            f"curl -sSN --unix-socket {d.socket} -X POST -H '{JSON}' -d '{missing}' "
            "http://hostd/v1/restore"
        )
        out = in_own_mount_namespace(script)
        assert out.returncode == 0, out.stderr
        first, listing, second = out.stdout.split("====\n")
        assert json.loads(first.splitlines()[-1])["event"] == "result", first
        assert f"{models}/llama/weights.bin" in listing.split()
        # the host's view is untouched: nothing was made at the host's path
        assert sorted(p.name for p in models.iterdir()) == ["only-on-host"]
        err = json.loads(second.splitlines()[-1])
        assert "error" in err, err  # refused before streaming: its own status and body
        assert "does not exist" in err["message"], err
        assert list((models / "only-on-host").iterdir()) == []


# -- 5. links: who gets the cache's own inodes ------------------------------------------------


def test_links_go_to_callers_that_cannot_write_them_only(work: Path) -> None:
    src = world_readable_tree(work / "src")
    (src / "weights.bin").chmod(0o444)
    home = nobody_dir(work / "home")
    with daemon(work) as d:
        d.publish(src, "t/tree")
        out = nobody_stream(
            d.socket, "/v1/restore", {"ref": "t/tree", "target": f"{home}/l", "mode": "link"}
        )
        assert out["event"] == "result", out
        assert out["linked"] >= 1, out
        st = (home / "l" / "weights.bin").stat()
        assert st.st_nlink > 1
        assert st.st_uid == 0
        assert st.st_mode & 0o777 == 0o444
        assert (home / "l").stat().st_uid == NOBODY
        # root could write through the link: it gets copies from auto, a refusal from link
        out = d.restore("t/tree", work / "r-auto", mode="auto")
        assert out["event"] == "result", out
        assert out["linked"] == 0, out
        assert (work / "r-auto" / "weights.bin").stat().st_nlink == 1
        out = d.restore("t/tree", work / "r-link", mode="link")
        assert out["event"] == "error", out
        assert "link_to_writers" in out["message"], out


def test_links_work_when_the_daemon_has_mounts_of_its_own(work: Path) -> None:
    """Under systemd the daemon runs in a mount namespace of its own (ProtectSystem=...): a
    blob's path there is another mount than the caller's, and a link never crosses mounts.
    Links are made from the blob as the caller sees it, so they still work."""
    src = world_readable_tree(work / "src")
    (src / "weights.bin").chmod(0o444)
    home = nobody_dir(work / "home")
    own = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'exec "$@"', "sh"]
    with Hostd(
        work / "d", socket_mode="0666", access={"publish": [f"uid:{NOBODY}"]}, wrap=own
    ) as d:
        d.publish(src, "t/tree")
        out = nobody_stream(
            d.socket, "/v1/restore", {"ref": "t/tree", "target": f"{home}/l", "mode": "link"}
        )
        assert out["event"] == "result", out
        assert out["linked"] >= 1, out
        assert (home / "l" / "weights.bin").stat().st_nlink > 1
        assert tree_digest(home / "l") == tree_digest(src)


def test_a_rewritten_link_is_never_served(work: Path) -> None:
    """Item 5: with link_to_writers on, root writes through a linked file and puts its mtime
    back; the next restore must not hand out those bytes as verified."""
    src = world_readable_tree(work / "src")
    (src / "weights.bin").chmod(0o444)
    good = (src / "weights.bin").read_bytes()
    with daemon(work, access={"link_to_writers": True}) as d:
        d.publish(src, "t/tree")
        out = d.restore("t/tree", work / "l", mode="link")
        assert out["event"] == "result", out
        assert out["linked"] >= 1, out
        victim = work / "l" / "weights.bin"
        st = victim.stat()
        with open(victim, "r+b") as f:
            f.write(b"EVIL")
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        out = d.restore("t/tree", work / "c", mode="copy")
        assert out["event"] == "result", out
        assert (work / "c" / "weights.bin").read_bytes() == good


def link_as_nobody(d: Hostd, target: Path) -> dict[str, Any]:
    """A link restore of t/l by nobody (who cannot write the blobs) into `target`."""
    out = nobody_stream(
        d.socket, "/v1/restore", {"ref": "t/l", "target": str(target), "mode": "link"}
    )
    assert out["event"] == "result", out
    assert out["linked"] > 0, out
    return out


def write_through(p: Path) -> None:
    """What a root process that reaches a caller's linked tree can do: write through the
    blob's read-only bit, then put its mtime back."""
    st = p.stat()
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"EVIL", 100)
    finally:
        os.close(fd)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def later_restores_get(d: Hostd, src: Path, home: Path, work: Path) -> None:
    """The restores of t/l after that, link and copy by nobody and a copy by root, get the
    published bytes."""
    want = tree_digest(src)
    for k, mode in enumerate(("link", "copy")):
        out = nobody_stream(
            d.socket, "/v1/restore", {"ref": "t/l", "target": f"{home}/b{k}", "mode": mode}
        )
        assert out["event"] == "result", out
        assert tree_digest(home / f"b{k}") == want, mode
    out = d.restore("t/l", work / "c", mode="copy")
    assert out["event"] == "result", out
    assert tree_digest(work / "c") == want


def test_with_link_checks_all_a_link_to_a_non_writer_rewritten_by_root_is_never_served(
    work: Path,
) -> None:
    """nobody restores by link: its tree holds the blobs' own inodes, which nobody cannot
    write. A root process that reaches nobody's tree (a root container on a volume it
    shares) can: it writes through one and puts its mtime back. With `[access] link_checks =
    "all"` every linked blob is checked by ctime, and the next restores, link and copy, by
    nobody and by root, get the published bytes."""
    src = world_readable_tree(work / "src")
    home = nobody_dir(work / "home")
    with daemon(work, access={"link_checks": "all"}) as d:
        d.publish(src, "t/l")
        link_as_nobody(d, home / "a")
        p = home / "a" / "weights.bin"
        assert p.stat().st_nlink > 1  # the blob's inode itself
        assert p.stat().st_uid == 0
        write_through(p)
        later_restores_get(d, src, home, work)


@pytest.mark.parametrize("access", [{}, {"link_checks": "lease"}], ids=["default", "lease"])
def test_with_link_checks_lease_a_write_through_a_link_breaks_its_lease_and_is_never_served(
    work: Path, access: dict[str, str]
) -> None:
    """With `[access] link_checks = "lease"`, the default, the daemon holds a read lease on
    each blob it links to a caller that cannot write it. A root process that opens one for
    writing through that caller's tree breaks it (its open waits until the daemon gives it
    up), so the write that puts the mtime back is caught: the blob is re-hashed before its
    next use, and every later restore gets the published bytes."""
    src = world_readable_tree(work / "src")
    home = nobody_dir(work / "home")
    with daemon(work, access=access) as d:
        d.publish(src, "t/l")
        link_as_nobody(d, home / "a")
        assert sample(d.metrics(), "hostd_link_leases") > 0
        write_through(home / "a" / "weights.bin")  # its open waits for the lease to go
        wait_for(lambda: "was opened for writing through a link" in d.log())
        assert sample(d.metrics(), "hostd_link_lease_breaks_total") == 1
        later_restores_get(d, src, home, work)


@pytest.mark.parametrize("progressive", [False, True])
def test_under_leases_a_cold_link_restore_holds_what_it_links(
    work: Path, progressive: bool
) -> None:
    """A cold restore links each file as its blob lands (the placer, before it links a
    batch, takes the batch's leases), progressive or into its hidden build: a write through
    one of its links afterwards is caught as through a warm restore's."""
    src = world_readable_tree(work / "src")
    home = nobody_dir(work / "home")
    with daemon(work) as p:
        p.publish(src, "t/l")
    origin = f"file://{work}/d/origin"
    with Hostd(work / "c", socket_mode="0666", origin=origin, access={"link_checks": "lease"}) as d:
        body = {"ref": "t/l", "target": f"{home}/a", "mode": "link", "progressive": progressive}
        out = nobody_stream(d.socket, "/v1/restore", body)
        assert out["event"] == "result", out
        assert out["linked"] > 0, out
        assert sample(d.metrics(), "hostd_link_leases") > 0
        write_through(home / "a" / "weights.bin")
        out = d.restore("t/l", work / "b", mode="copy")
        assert out["event"] == "result", out
        assert tree_digest(work / "b") == tree_digest(src)


@pytest.mark.parametrize("checks", ["lease", "all"])
def test_a_linked_tree_removed_costs_a_rehash_only_where_every_link_is_lent(
    work: Path, checks: str
) -> None:
    """Removing a linked tree moves the ctime of every blob it linked, as a write does. With
    link_checks = "all" (every link lent) the next restore re-hashes them all; with "lease"
    the leases held since the first restore say no one opened them for writing, and nothing
    is re-hashed."""
    src = world_readable_tree(work / "src")
    home = nobody_dir(work / "home")
    with daemon(work, access={"link_checks": checks}) as d:
        d.publish(src, "t/l")
        link_as_nobody(d, home / "a")
        before = sample(d.metrics(), "hostd_blob_rehashes_total", tier="mem")
        rmtree(home / "a")
        link_as_nobody(d, home / "b")
        assert tree_digest(home / "b") == tree_digest(src)
        rehashed = sample(d.metrics(), "hostd_blob_rehashes_total", tier="mem") - before
        if checks == "lease":
            assert rehashed == 0
        else:
            assert rehashed > 0


def test_a_blob_open_for_writing_is_not_linked_under_leases(work: Path) -> None:
    """A blob some process holds open for writing cannot be leased: the restore does not
    link it (it checks it again, then refuses, naming it), and links it once it is closed."""
    src = world_readable_tree(work / "src")
    home = nobody_dir(work / "home")
    with daemon(work, access={"link_checks": "lease"}) as d:
        d.publish(src, "t/l")
        blob = max(
            (p for p in (d.root / "mem" / "blobs").rglob("*") if p.is_file()),
            key=lambda p: p.stat().st_size,
        )
        fd = os.open(blob, os.O_RDWR)  # root, behind hostd's back
        try:
            out = nobody_stream(
                d.socket, "/v1/restore", {"ref": "t/l", "target": f"{home}/a", "mode": "link"}
            )
            assert out["event"] == "error", out
            assert "could not be linked" in out["message"], out
            assert "open for writing" in out["message"], out
            assert not (home / "a").exists()
        finally:
            os.close(fd)
        link_as_nobody(d, home / "a")
        assert tree_digest(home / "a") == tree_digest(src)


# -- 10. a crash leaves no debris -------------------------------------------------------------


def test_a_killed_daemon_leaves_no_build_directory(work: Path) -> None:
    src = work / "src"
    src.mkdir()
    for i in range(8):
        (src / f"big{i}").write_bytes(os.urandom(32 << 20))
    world_readable_tree(src)
    home = nobody_dir(work / "home")
    body = json.dumps({"ref": "t/big", "target": f"{home}/out", "mode": "copy"})
    caught = False
    for attempt in range(5):  # the build lasts a fraction of a second: catch it inside
        with daemon(work) as d:
            if attempt == 0:
                d.publish(src, "t/big")
            client = subprocess.Popen(
                [*NOBODY_PREFIX, *CURL, str(d.socket), "-d", body, "http://hostd/v1/restore"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_for(lambda: any(p.name.startswith(".out") for p in home.iterdir()), step=0)
                d.kill()  # SIGKILL the daemon alone: its helper sees it go, removes the build
            finally:
                client.wait(60)
        wait_for(lambda: not any(p.name.startswith(".out") for p in home.iterdir()), 60)
        if not (home / "out").exists():
            caught = True
            break
        shutil.rmtree(home / "out")
    assert caught, "the restore always finished before the daemon was killed"
    # A build left by a helper killed too is swept by the next restore into the target: a
    # directory of the caller's with the helper's mark. Not one with a build's name alone:
    # in a directory two users may write, one can give the other's tree that name, and the
    # sweep, as the caller, would remove what the other could not.
    leftover = home / ".out.hostd-0123456789ab"
    renamed = home / ".out.hostd-000000000000"
    for dir_ in (leftover, renamed):
        dir_.mkdir()
        (dir_ / "junk").write_text("x")
        os.chown(dir_, NOBODY, NOBODY)
        os.chown(dir_ / "junk", NOBODY, NOBODY)
    os.setxattr(leftover, fsops.BUILD_MARK, b"1")  # as the helper marks its builds
    with daemon(work) as d:
        out = nobody_stream(
            d.socket, "/v1/restore", {"ref": "t/big", "target": f"{home}/out", "mode": "copy"}
        )
        assert out["event"] == "result", out
    assert sorted(p.name for p in home.iterdir()) == [renamed.name, "out"]
    assert (renamed / "junk").read_text() == "x"
    with pytest.raises(OSError, match="No data available"):  # no mark: the tree is no build
        os.getxattr(home / "out", fsops.BUILD_MARK)


class _WrittenDuringCopy(AsUser):
    """A writer holding a link writes the blob while the helper copies it: the one moment
    no test can hit for sure, so this helper's `files` does it right before the real copy
    (the copy gets the write) or right after it (the copy is whole, the blob moved)."""

    blob: Path
    lends: bool  # whether the blob is ever lent: from the start (lent) or as the write comes
    lent: bool
    before: bool  # the write lands before the copy reads the blob

    def is_lent(self, _digest: bytes) -> bool:
        return self.lends and self.lent

    def files(
        self, items: Sequence[tuple[str, int, int, str, int | None]], fds: Sequence[int]
    ) -> None:
        if not self.before:
            super().files(items, fds)
        self.lent = True
        st = self.blob.stat()
        with open(self.blob, "r+b") as f:
            f.write(b"EVIL")
        os.utime(self.blob, ns=(st.st_atime_ns, st.st_mtime_ns))
        if self.before:
            super().files(items, fds)


@contextlib.contextmanager
def _nobody_caller() -> Iterator[tuple[Spawner, Caller]]:
    """A helper spawner and a process of nobody's to be the caller."""
    sleeper = subprocess.Popen([*NOBODY_PREFIX, "sleep", "60"])
    spawner = Spawner()
    try:
        wait_for(lambda: _uid_of(sleeper.pid) == NOBODY)
        yield spawner, Caller(sleeper.pid, NOBODY, NOBODY, ())
    finally:
        spawner.close()
        sleeper.kill()
        sleeper.wait()


def _one_blob(work: Path, data: bytes, mode: int) -> tuple[mf.Manifest, Path]:
    """A manifest of one file, weights.bin, of `data` and `mode`, and its blob (0444)."""
    chunk = mf.Chunk(chunk_id(data), len(data), mf.CODEC_RAW)
    m = mf.build(
        chunk_size=1 << 20, files=[mf.FileEntry("weights.bin", mode, len(data), (chunk,), 0)]
    )
    blob = work / "blob"
    blob.write_bytes(data)
    blob.chmod(0o444)
    return m, blob


def _copy_by(fs: AsUser, target: str, m: mf.Manifest, blob: Path, watch: Watch) -> None:
    """Start the helper `fs` as its caller, and have it build `m` at `target` by copies of
    `blob` (a `copy` restore's materialize), checked as `watch` says."""
    _, fds = fs.call("init", nfds=1, uid=NOBODY, gid=NOBODY, groups=[], pid=fs.caller.pid)
    fs.root_fd = fds[0]
    try:
        fs.target(target, False)
        materialize(
            m,
            fs,
            lambda _d: str(blob),
            mode="copy",
            replace=False,
            link_ok=False,
            cancel=threading.Event(),
            watch=watch,
        )
    finally:
        fs.close()


def test_a_copy_that_saw_a_lent_blob_move_is_not_handed_over(work: Path) -> None:
    data = os.urandom(100_000)
    m, blob = _one_blob(work, data, 0o644)
    home = nobody_dir(work / "home")
    with _nobody_caller() as (spawner, caller):
        # lent: never, from the start, or only once the copy was under way (another
        # restore's link to a writer, which wrote at once); the write before the copy read
        # the blob, or after. A copy whose blob moved is read back: handed over if whole.
        cases = [("no", "after", True), ("yes", "after", True), ("meanwhile", "after", True)]
        cases += [("yes", "before", False), ("meanwhile", "before", False)]
        for lent, when, expect_ok in cases:
            sock, pidfd = spawner.spawn()
            fs = _WrittenDuringCopy(caller, sock, pidfd)
            fs.blob = blob
            fs.lends, fs.lent, fs.before = lent != "no", lent == "yes", when == "before"
            target = f"{home}/out-{lent}-{when}"
            if expect_ok:  # not lent (no writer holds a link), or read back whole
                _copy_by(fs, target, m, blob, Watch(lent=fs.is_lent))
            else:
                with pytest.raises(ChunkCorrupt, match="written to through a link"):
                    _copy_by(fs, target, m, blob, Watch(lent=fs.is_lent))
            blob.chmod(0o644)
            blob.write_bytes(data)
            blob.chmod(0o444)
        made = ["out-meanwhile-after", "out-no-after", "out-yes-after"]
        assert sorted(p.name for p in home.iterdir()) == made, "no build left"
        for name in made:
            assert (home / name / "weights.bin").read_bytes() == data


@pytest.mark.parametrize("mode", [0o644, 0o200])
def test_a_copy_whose_lent_blob_was_only_linked_is_read_back(work: Path, mode: int) -> None:
    """Another restore links a lent blob while the helper copies it (its ctime moves, its
    bytes do not): the copy is read back as the caller and handed over whole. One whose mode
    denies its owner reading cannot be read back: not handed over (a rebuild, where the
    tree is hidden), and the error says why, not that the blob was written to."""
    data = os.urandom(100_000)
    m, blob = _one_blob(work, data, mode)
    home = nobody_dir(work / "home")

    class LinkedDuringCopy(AsUser):
        def files(
            self, items: Sequence[tuple[str, int, int, str, int | None]], fds: Sequence[int]
        ) -> None:
            super().files(items, fds)
            os.link(blob, work / "another")  # (what another restore's link does to it)

    with _nobody_caller() as (spawner, caller):
        fs = LinkedDuringCopy(caller, *spawner.spawn())
        if mode & 0o400:
            _copy_by(fs, f"{home}/out", m, blob, Watch(lent=lambda _d: True))
            assert (home / "out" / "weights.bin").read_bytes() == data
        else:
            with pytest.raises(ChunkCorrupt, match="could not be read back"):
                _copy_by(fs, f"{home}/out", m, blob, Watch(lent=lambda _d: True))
            assert not (home / "out").exists()


def _big_and_small(work: Path) -> Path:
    """A tree of a 96 MiB file (its copy lasts tens of milliseconds) and a small one."""
    src = work / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(8 << 20) * 12)
    (src / "small.txt").write_text("small")
    return src


def _lend_big(d: Hostd, target: Path) -> Path:
    """Link-restore _big_and_small's tree (published as t/big) into `target`, which lends
    its blobs (root, link_to_writers): big.bin there, the link to its blob."""
    out = d.restore("t/big", target, mode="link")
    assert out["event"] == "result", out
    assert out["linked"] == 2, out
    return target / "big.bin"


def _write_at_the_end(path: Path, data: bytes) -> None:
    """Write `data` over the end of `path` (where a copy has not come yet, while it runs),
    its mtime put back, as a writer through a link would."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(-len(data), os.SEEK_END)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _race(
    d: Hostd, body: dict[str, Any], started: tuple[Path, str], meddle: Callable[[], object]
) -> list[dict[str, Any]]:
    """The events of a restore of `body`, with `meddle` run as soon as a path matching
    `started` (a directory, a glob pattern under it) says its copy is under way, or the
    restore is over (then the meddling came too late)."""
    root, pattern = started
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(stream, d.socket, "/v1/restore", body)
        wait_for(lambda: job.done() or any(root.glob(pattern)), step=0)
        meddle()
        return job.result()


@pytest.mark.parametrize(
    ("meddle", "checks"), [("link", "writers"), ("write", "writers"), ("write", "lease")]
)
def test_a_copy_that_saw_a_lent_blob_move_is_built_again(
    work: Path, meddle: str, checks: str
) -> None:
    """Root restores with link_to_writers on: a link restore lends a big file's blob, then a
    copy restore runs while the test links the blob again, as another restore would ("link":
    only its ctime moves), or writes through the link, at the file's end, and puts the mtime
    back ("write"). Either failed the restore. A copy that saw its blob move is read back:
    whole (the link), it is handed over; not (the write), the restore builds its hidden tree
    again, the blob checked first (re-hashed; a bad one fetched again), says so in a
    `rebuilt` warning, and hands over the published bytes. (Under leases the copy restore's
    check re-hashes the blob under a lease, so a link alone costs no read back.)"""
    src = _big_and_small(work)
    want = tree_digest(src)
    raced = False
    with daemon(work, access={"link_to_writers": True, "link_checks": checks}) as d:
        d.publish(src, "t/big")
        for attempt in range(8):  # the copy lasts tens of milliseconds: meddle inside it
            lent = _lend_big(d, work / f"l{attempt}")
            target = work / f"c{attempt}"
            events = _race(
                d,
                {"ref": "t/big", "target": str(target), "mode": "copy"},
                (work, f".{target.name}.hostd-*/**/big.bin"),
                functools.partial(os.link, lent, work / f"another{attempt}")
                if meddle == "link"
                else functools.partial(_write_at_the_end, lent, b"EVIL"),
            )
            out = outcome(events)
            assert out["event"] == "result", out
            assert tree_digest(target) == want
            assert sum(out["bytes_by_source"].values()) == out["bytes"], out  # (one pass's)
            assert not any(work.glob(".c*")), "a build left behind"
            rebuilt = [e for e in events if e.get("warning") == "rebuilt"]
            if meddle == "link":
                assert not rebuilt, rebuilt  # read back: whole
                if "were read back: they hash right" in d.log():
                    raced = True
                    break
            elif rebuilt:
                assert rebuilt[0]["path"] == "big.bin", rebuilt
                assert "built again" in rebuilt[0]["message"], rebuilt
                raced = True
                break
    assert raced, "every copy was over before the blob moved"


def test_a_progressive_copy_that_saw_its_lent_blob_written_is_taken_away(work: Path) -> None:
    """The same write through a link, into a progressive restore with keep_partial: that
    restore cannot build again (its files are the caller's already), so it fails, and the
    copies not handed over (the one that saw its blob written, and those sent with it) go
    whatever keep_partial says; what was told to have landed stays."""
    src = _big_and_small(work)
    raced = False
    with daemon(work, access={"link_to_writers": True}) as d:
        d.publish(src, "t/big")
        for attempt in range(8):  # the copy lasts tens of milliseconds: write inside it
            lent = _lend_big(d, work / f"l{attempt}")
            target = work / f"c{attempt}"
            body = {
                "ref": "t/big",
                "target": str(target),
                "mode": "copy",
                "progressive": True,
                "keep_partial": True,
                "order": ["small.txt", "big.bin"],
            }
            events = _race(
                d,
                body,
                (target, ".hostd-part-*"),
                functools.partial(_write_at_the_end, lent, b"EVIL"),
            )
            out = outcome(events)
            if out["event"] == "result":  # the copy was over before the write
                assert (target / "big.bin").read_bytes()[-4:] != b"EVIL"
                # the published bytes back, for the next try
                _write_at_the_end(lent, (src / "big.bin").read_bytes()[-4:])
                continue
            assert "written to through a link" in out["message"], out
            landed = sorted(e["path"] for e in events if e.get("event") == "file")
            assert "big.bin" not in landed, events
            # nothing but what was told to have landed: no copy that saw the write, whole
            # or under its scratch name
            assert sorted(p.name for p in target.iterdir()) == landed
            for path in landed:
                assert (target / path).read_bytes() == (src / path).read_bytes()
            raced = True
            break
    assert raced, "every copy was over before the blob was written"


def test_a_helper_whose_pidfd_is_past_1023_is_waited_for_and_stopped() -> None:
    """A copy restore holds up to some 2,000 blob descriptors: a helper started meanwhile
    got a pidfd past 1023, which select() refuses, and its close raised ValueError (a link
    restore whose tree was committed answered "internal"; a dead helper's files were not
    taken back)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE's hard limit is {hard}: no descriptor past 1023 here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(1100)]
    try:
        with _nobody_caller() as (spawner, caller):
            fs = AsUser.start(caller, spawner)
            assert fs.pidfd > 1023
            fs.close()  # waits for the helper to exit
            other = AsUser.start(caller, spawner)
            assert other.pidfd > 1023
            try:
                assert other.stopped()
            finally:
                other.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_calls_sent_ahead_from_several_threads_each_get_their_own_answer(work: Path) -> None:
    """Batches of copies go to the helper without waiting for the answers owed before them
    (AsUser.call): each call still gets its own answer, a refused batch its own error, and
    every file is made as the caller, from the descriptors sent with its own batch."""
    home = nobody_dir(work / "home")
    blob = work / "blob"
    blob.write_bytes(b"bytes")
    blob.chmod(0o444)
    sleeper = subprocess.Popen([*NOBODY_PREFIX, "sleep", "60"])
    spawner = Spawner()
    try:
        wait_for(lambda: _uid_of(sleeper.pid) == NOBODY)
        fs = AsUser.start(Caller(sleeper.pid, NOBODY, NOBODY, ()), spawner)
        try:
            fs.target(f"{home}/out", False)
            fs.begin(["d"], [])
            fs.files([("d/taken", 0o644, 0, "empty", None)], [])

            def batch(i: int) -> BaseException | None:
                items: list[tuple[str, int, int, str, int | None]] = [
                    (f"d/f{i}-{k}", 0o640, 5, "copy", i) for k in range(20)
                ]
                if i % 10 == 3:  # refused: the last name is taken
                    items.append(("d/taken", 0o644, 0, "empty", None))
                fds = [os.open(blob, os.O_RDONLY | os.O_CLOEXEC) for _ in range(20)]
                try:
                    fs.files(items, fds)
                except UsageError as e:
                    return e
                finally:
                    for fd in fds:
                        os.close(fd)
                return None

            start = threading.Barrier(4)

            def worker(first: int) -> list[BaseException | None]:
                start.wait()
                return [batch(i) for i in range(first, 40, 4)]

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                got = list(pool.map(worker, range(4)))
            answers = {i: got[i % 4][i // 4] for i in range(40)}
            for i, answer in answers.items():
                if i % 10 == 3:
                    assert "'d/taken' appeared in the tree being built" in str(answer), i
                else:
                    assert answer is None, (i, answer)
            assert fs.commit(False) is None
        finally:
            fs.close()
        out = home / "out" / "d"
        assert len(list(out.iterdir())) == 40 * 20 + 1
        for i in range(40):
            for k in range(20):
                st = os.stat(out / f"f{i}-{k}")
                assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)
                assert (st.st_mtime_ns, (out / f"f{i}-{k}").read_bytes()) == (i, b"bytes")
    finally:
        spawner.close()
        sleeper.kill()
        sleeper.wait()


class _CancelledAfterFirstCopies(AsUser):
    """The caller goes away once the helper has answered a first batch of copies, while the
    next ones are already on its socket."""

    cancel: threading.Event

    def files(
        self, items: Sequence[tuple[str, int, int, str, int | None]], fds: Sequence[int]
    ) -> None:
        super().files(items, fds)
        if fds:
            self.cancel.set()


@pytest.mark.parametrize("mode", ["copy", "auto"])
def test_a_cancel_with_batches_of_copies_out_leaves_nothing(work: Path, mode: str) -> None:
    """Batches go to the helper ahead of its answers, and in `auto` from a thread of their
    own while links are made: a cancel still stops them, waits for those out, and the
    helper removes everything built."""
    blobs = work / "blobs"
    blobs.mkdir()
    blobs.chmod(0o755)
    files = []
    for i in range(3000):  # half of them linked in `auto` (read-only), half copied
        data = os.urandom(1000 + i % 3000)
        chunk = mf.Chunk(chunk_id(data), len(data))
        entry = mf.FileEntry(f"d{i % 30}/f{i}", 0o755 if i % 2 else 0o644, len(data), (chunk,), i)
        blob = blobs / entry.digest.hex()
        blob.write_bytes(data)
        blob.chmod(0o444)
        os.utime(blob, ns=(i, i))
        files.append(entry)
    mtimes = {f.digest: f.mtime for f in files}
    m = mf.build(chunk_size=1 << 20, files=files)
    home = nobody_dir(work / "home")
    sleeper = subprocess.Popen([*NOBODY_PREFIX, "sleep", "60"])
    spawner = Spawner()
    try:
        wait_for(lambda: _uid_of(sleeper.pid) == NOBODY)
        sock, pidfd = spawner.spawn()
        fs = _CancelledAfterFirstCopies(Caller(sleeper.pid, NOBODY, NOBODY, ()), sock, pidfd)
        fs.cancel = threading.Event()
        _, fds = fs.call("init", nfds=1, uid=NOBODY, gid=NOBODY, groups=[], pid=sleeper.pid)
        fs.root_fd = fds[0]
        try:
            fs.target(f"{home}/out", False)
            with pytest.raises(Cancelled):
                materialize(
                    m,
                    fs,
                    lambda d: f"{blobs}/{d.hex()}",
                    mode=mode,
                    replace=False,
                    link_ok=True,
                    cancel=fs.cancel,
                    blob_mtime=mtimes.get,
                )
        finally:
            fs.close()
        assert list(home.iterdir()) == [], "no target, no build directory"
    finally:
        spawner.close()
        sleeper.kill()
        sleeper.wait()


def _helpers_of(daemon_pid: int) -> list[int]:
    """Helper processes of a daemon: the children of its zygote (hostd.fsops)."""

    def children(pid: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with open(task / "children") as f:
                out += [int(c) for c in f.read().split()]
        return out

    return [h for z in children(daemon_pid) for h in children(z)]


def test_a_helper_its_caller_stopped_holds_nothing_for_long(work: Path) -> None:
    """The caller may signal its helper (it runs with the caller's uid): a stopped helper
    must not hold a daemon thread, a place under the caps or its blobs for ever."""
    _, origin_dir = published_file(work, "a.bin", 200_000, "t/tree")
    home = nobody_dir(work / "home")
    with (
        HeldOrigin(origin_dir, gated=True) as origin,  # its helper stays while this is shut
        daemon(work, origin=origin.url, access={"max_operations_per_uid": 1}) as d,
    ):
        assert d.proc is not None
        body = json.dumps({"ref": "t/tree", "target": f"{home}/out", "mode": "copy"})
        client = subprocess.Popen(
            [*NOBODY_PREFIX, *CURL, str(d.socket), "-d", body, "http://hostd/v1/restore"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            helper = 0

            def found() -> bool:
                nonlocal helper
                for h in _helpers_of(d.proc.pid):  # type: ignore[union-attr]
                    with contextlib.suppress(OSError):
                        if _uid_of(h) == NOBODY:
                            helper = h
                            return True
                return False

            wait_for(found)
            assert origin.first.wait(60)  # fetching: the helper made the build, and waits
            as_nobody("kill", "-STOP", str(helper))  # what the caller itself may do
        finally:
            client.kill()
            client.wait()
            origin.gate.set()
        t0 = time.monotonic()
        wait_for(lambda: d.api("GET", "/v1/status")[1]["in_flight"] == 0, timeout=60)
        assert time.monotonic() - t0 < 45
        wait_for(lambda: not Path(f"/proc/{helper}").exists(), timeout=30)
        out = nobody_stream(
            d.socket, "/v1/restore", {"ref": "t/tree", "target": f"{home}/again", "mode": "copy"}
        )
        assert out["event"] == "result", out


def test_a_root_caller_keeps_only_the_capabilities_it_has(work: Path) -> None:
    """A container's root is uid 0 too, often with capabilities dropped: its helper gets no
    more than the caller had, so hostd lends it nothing it lacked."""
    src = world_readable_tree(work / "src")
    theirs = nobody_dir(work / "theirs")
    theirs.chmod(0o700)  # root may write here only through CAP_DAC_OVERRIDE
    weak = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all")
    with daemon(work) as d:
        d.publish(src, "t/tree")
        body = {"ref": "t/tree", "target": f"{theirs}/x", "mode": "copy"}
        out = curl_stream(d.socket, "/v1/restore", body, *weak)
        assert out["event"] == "error", out
        assert "permission denied" in out["message"].lower(), out
        assert list(theirs.iterdir()) == []
        out = curl_stream(d.socket, "/v1/restore", body)  # root with all its capabilities
        assert out["event"] == "result", out


def _reclaim_by_a_successor(fs: AsUser, caller: Caller, spawner: Spawner, ledger: Any) -> None:
    """`fs` made sure dead, a new helper of `caller`, in the root it opened, takes back what
    `ledger` says it placed."""
    assert fs.stopped()
    fresh = AsUser.start(caller, spawner, root_fd=fs.root_fd)
    try:
        fresh.reclaim(ledger, [])
    finally:
        fresh.close()


@contextlib.contextmanager
def nobody_helper() -> Iterator[tuple[Caller, Spawner, AsUser]]:
    """A process of nobody's (the caller), a spawner, and a helper acting for the caller;
    all ended afterwards."""
    sleeper = subprocess.Popen([*NOBODY_PREFIX, "sleep", "60"])
    spawner = Spawner()
    try:
        wait_for(lambda: _uid_of(sleeper.pid) == NOBODY)
        caller = Caller(sleeper.pid, NOBODY, NOBODY, ())
        fs = AsUser.start(caller, spawner)
        try:
            yield caller, spawner, fs
        finally:
            fs.close()
    finally:
        spawner.close()
        sleeper.kill()
        sleeper.wait()


def test_a_batch_that_failed_half_landed_is_in_the_ledger(work: Path) -> None:
    """A progressive batch whose second file finds the caller's own file at its name fails
    there; the first had landed. The helper's error answer says so, so that, the helper
    killed before it could take it back, a new one does: the caller's file stays."""
    home = nobody_dir(work / "home")
    with nobody_helper() as (caller, spawner, fs):
        target = home / "out"
        fs.target(str(target), False)
        fs.begin([], [], progressive=True)
        theirs = target / "b"
        theirs.write_bytes(b"the caller's")
        os.chown(theirs, NOBODY, NOBODY)
        batch = [(name, 0o644, 0, "empty", None) for name in ("a", "b", "c")]
        with pytest.raises(UsageError, match="'b' appeared in the target"):
            fs.files(batch, [])
        ledger = fs.ledger
        assert ledger is not None
        assert sorted(ledger.placed) == ["a"]
        _reclaim_by_a_successor(fs, caller, spawner, ledger)
        assert sorted(p.name for p in target.iterdir()) == ["b"]
        assert theirs.read_bytes() == b"the caller's"


def test_a_batch_landed_but_never_answered_is_in_the_ledger(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper killed (kill -9, the OOM killer) after a batch's renames, before its
    answer: those files had landed, and the ledger, filled from answers alone, named none
    of them. The successor took back the rest; they stayed, and so did their directory and
    the target. The helper now tells the inodes of a batch ahead of its renames."""
    home = nobody_dir(work / "home")
    with nobody_helper() as (caller, spawner, fs):
        target = home / "out"
        fs.target(str(target), False)
        fs.begin(["w"], [], progressive=True)
        fs.files([("a", 0o644, 0, "empty", None)], [])
        lost: list[dict[str, Any]] = []

        def killed_before_it_answers(sock: Any) -> Any:
            got = frames.recv_frame(sock)
            if got is not None and not lost and "w/c" in str(got[0].get("placed")):
                lost.append(got[0])  # (as if never sent: it was killed right before)
                os.kill(_helper_pid(fs), signal.SIGKILL)
                return None
            return got

        monkeypatch.setattr(hostd.asuser, "recv_frame", killed_before_it_answers)
        with pytest.raises(TransientError, match="stopped answering"):
            fs.files([("w/c", 0o644, 0, "empty", None)], [])
        assert lost
        assert (target / "w" / "c").exists()  # landed
        ledger = fs.ledger
        assert ledger is not None
        _reclaim_by_a_successor(fs, caller, spawner, ledger)
        assert not target.exists(), sorted(str(p) for p in target.rglob("*"))


@pytest.mark.parametrize("kind", ["ranged", "symlink"])
def test_a_ranged_file_or_symlink_landed_but_never_answered_is_in_the_ledger(
    work: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """As above, for a file the daemon wrote in ranges (`parts`, then `land`), and for a
    symlink."""
    home = nobody_dir(work / "home")
    with nobody_helper() as (caller, spawner, fs):
        target = home / "out"
        fs.target(str(target), False)
        fs.begin(["w"], [], progressive=True)
        if kind == "ranged":
            _, fds = fs.parts(["w/big"])
            for fd in fds:
                os.write(fd, b"ranges")
                os.close(fd)

        def killed_before_it_answers(sock: Any) -> Any:
            got = frames.recv_frame(sock)
            if got is not None and "placed" in got[0]:
                os.kill(_helper_pid(fs), signal.SIGKILL)
                return None  # (as if never sent: it was killed right before)
            return got

        monkeypatch.setattr(hostd.asuser, "recv_frame", killed_before_it_answers)
        make = (
            functools.partial(fs.land, [("w/big", 0o644, None)])
            if kind == "ranged"
            else functools.partial(fs.symlinks, [("w/big", "elsewhere")])
        )
        with pytest.raises(TransientError, match="stopped answering"):
            make()
        assert os.path.lexists(target / "w" / "big")  # landed
        ledger = fs.ledger
        assert ledger is not None
        _reclaim_by_a_successor(fs, caller, spawner, ledger)
        assert not target.exists(), sorted(str(p) for p in target.rglob("*"))


def test_directories_made_but_never_answered_are_taken_back(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper killed while it makes a progressive restore's directories (`dirs`), before
    its answer: the ledger, filled from that answer alone, named none of them, and they
    stayed, and so did the target the restore made. The daemon now keeps the directories
    it asked for until the answer says which were made."""
    home = nobody_dir(work / "home")
    with nobody_helper() as (caller, spawner, fs):
        target = home / "out"
        fs.target(str(target), False)

        def killed_before_it_answers(sock: Any) -> Any:
            got = frames.recv_frame(sock)
            if got is not None and got[0].get("made_dirs"):
                os.kill(_helper_pid(fs), signal.SIGKILL)
                return None  # (as if never sent: it was killed right before)
            return got

        monkeypatch.setattr(hostd.asuser, "recv_frame", killed_before_it_answers)
        with pytest.raises(TransientError, match="stopped answering"):
            fs.begin(["a", "a/b", "c"], [], progressive=True)
        assert (target / "a" / "b").is_dir()  # made
        ledger = fs.ledger
        assert ledger is not None
        _reclaim_by_a_successor(fs, caller, spawner, ledger)
        assert not target.exists(), sorted(str(p) for p in target.rglob("*"))


@pytest.mark.parametrize("how", ["twice", "with a descriptor", "before a target"])
def test_a_landing_out_of_turn_ends_the_helper(
    work: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A `landing` frame comes once, without descriptors, and only ahead of a batch's
    answer. One more (taken for the answer, it said a batch had landed that had not, and
    every later answer went to the request after its own), one with a descriptor, or one
    ahead of another op is out of turn: the helper, which answers as its caller may make
    it, is ended, as where it stops answering, and nothing later is paired with it."""
    home = nobody_dir(work / "home")
    with nobody_helper() as (_, _, fs):
        target = home / "out"
        if how != "before a target":
            fs.target(str(target), False)
            fs.begin(["w"], [], progressive=True)
        real = frames.recv_frame
        r, w = os.pipe()
        os.close(w)
        try:

            def out_of_turn(sock: Any) -> Any:
                if how == "before a target":
                    return {"landing": [["w/a", 1]]}, []
                got = real(sock)
                if got is not None and "landing" in got[0]:
                    return got[0], [os.dup(r)]
                return got

            monkeypatch.setattr(hostd.asuser, "recv_frame", out_of_turn)
            if how == "twice":  # the real landing, then the same again where the answer goes
                first = True

                def twice(sock: Any) -> Any:
                    nonlocal first
                    got = real(sock)
                    if got is not None and "landing" in got[0] and first:
                        first = False
                        monkeypatch.setattr(hostd.asuser, "recv_frame", lambda _s: got)
                    return got

                monkeypatch.setattr(hostd.asuser, "recv_frame", twice)
            call = (
                functools.partial(fs.target, str(target), False)
                if how == "before a target"
                else functools.partial(fs.files, [("w/a", 0o644, 0, "empty", None)], [])
            )
            with pytest.raises(TransientError, match="stopped answering"):
                call()
        finally:
            os.close(r)
        monkeypatch.setattr(hostd.asuser, "recv_frame", real)
        assert fs.stopped()
        with pytest.raises(TransientError):  # (no later call takes a stale answer)
            fs.call("close")


def test_directories_made_before_a_failed_dirs_are_in_the_ledger(work: Path) -> None:
    """A progressive restore's directories are made in its target once the daemon holds it;
    where one cannot be made, the helper's error answer names those made before it, so
    that, the helper killed before it could take them back, a new one does."""
    home = nobody_dir(work / "home")
    with nobody_helper() as (caller, spawner, fs):
        target = home / "out"
        fs.target(str(target), False)
        with pytest.raises(HostdError, match="File name too long"):
            fs.begin(["a", "a/b", "c" * 300], [], progressive=True)
        ledger = fs.ledger
        assert ledger is not None
        assert ledger.made_dirs == ["a", "a/b"]
        _reclaim_by_a_successor(fs, caller, spawner, ledger)
        assert not target.exists()  # made by this restore, and empty once taken back


def test_a_progressive_begin_that_failed_is_taken_back_though_its_helper_stops(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger knew the directories a failed `dirs` made, but nothing in the daemon's
    own flow used it: the placer's begin failed, and the restore closed the helper. The
    caller, stopping its helper right then, kept target and directories in place. The
    placer now takes back a failed begin: a successor does, where the helper answers not."""
    monkeypatch.setattr(hostd.asuser, "CALL_TIMEOUT", 2.0)  # (the stopped helper's wait)
    home = nobody_dir(work / "home")
    with nobody_helper() as (_, _, fs):
        target = home / "out"
        fs.target(str(target), False)
        call = fs.call

        def stopped_after_dirs(op: str, *args: Any, **kw: Any) -> Any:
            try:
                return call(op, *args, **kw)
            finally:
                if op == "dirs":  # the caller stops its helper at the worst moment
                    os.kill(_helper_pid(fs), signal.SIGSTOP)

        fs.call = stopped_after_dirs  # type: ignore[method-assign]
        m = mf.build(chunk_size=1 << 16, files=[], dirs=["a", "a/b", "c" * 300])
        placer = Placer(m, fs, mode="copy", link_ok=False, cancel=threading.Event(), on_files=print)
        with pytest.raises(HostdError, match="File name too long"):
            placer.begin()
        assert not target.exists()


def test_a_call_past_its_time_ends_the_helper_so_no_later_call_takes_its_answer(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers are paired with requests by order. A batch whose answer did not come in time
    (a target filesystem that stalls, then recovers) failed, and the helper's late answer to
    it was then taken by the next call as its own: files told created that were not. The
    helper now goes at the first lost answer, and every later call fails at once."""
    monkeypatch.setattr(hostd.asuser, "CALL_TIMEOUT", 1.0)
    home = nobody_dir(work / "home")
    with nobody_helper() as (_, _, fs):
        fs.target(f"{home}/out", False)
        fs.begin(["d"], [])
        os.kill(_helper_pid(fs), signal.SIGSTOP)
        with pytest.raises(TransientError, match="stopped answering"):
            fs.files([("d/a", 0o644, 0, "empty", None)], [])
        with contextlib.suppress(ProcessLookupError):
            os.kill(_helper_pid(fs), signal.SIGCONT)  # (it recovers, or is gone)
        started = time.monotonic()
        with pytest.raises(TransientError, match="stopped answering"):
            fs.files([("d/b", 0o644, 0, "empty", None)], [])
        assert time.monotonic() - started < 1.0  # at once, not after its own timeout
        assert fs.stopped()


def _helper_pid(fs: AsUser) -> int:
    with open(f"/proc/self/fdinfo/{fs.pidfd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pid:"))


def test_a_dead_helpers_progressive_files_are_reclaimed_after_the_caller_is_gone_too(
    work: Path,
) -> None:
    """A progressive restore's caller and helper both killed (`kill -9 -1` as that user): a
    new helper, in the root the dead one opened, takes back what the ledger says was placed
    and the scratch file of the batch it was writing, as nobody: the caller's own file
    stays, and so does anything a lying ledger names outside the target."""
    home = nobody_dir(work / "home")
    secret = home / "secret"
    secret.write_bytes(b"the caller's, beside the target")
    os.chown(secret, NOBODY, NOBODY)
    sleeper = subprocess.Popen([*NOBODY_PREFIX, "sleep", "60"])
    spawner = Spawner()
    try:
        wait_for(lambda: _uid_of(sleeper.pid) == NOBODY)
        caller = Caller(sleeper.pid, NOBODY, NOBODY, ())
        fs = AsUser.start(caller, spawner)
        try:
            target = home / "out"
            fs.target(str(target), False)
            fs.begin(["d"], [], progressive=True)
            fs.files([("d/a", 0o644, 0, "empty", None), ("b", 0o644, 0, "empty", None)], [])
            ledger = fs.ledger
            assert ledger is not None
            assert sorted(ledger.placed) == ["b", "d/a"]
            part = target / "d" / ".hostd-part-12345"  # a batch being written when it died
            part.write_bytes(b"half")
            os.chown(part, NOBODY, NOBODY)
            mine = target / "mine"  # the caller's own, made while the restore ran
            mine.write_bytes(b"keep")
            os.chown(mine, NOBODY, NOBODY)
            # as if the helper had lied: a directory out of the tree, a file in it
            ledger.made_dirs.append("..")
            st = secret.stat()
            ledger.placed["../secret"] = (st.st_ino, st.st_ctime_ns)
            sleeper.kill()
            sleeper.wait()
            _reclaim_by_a_successor(fs, caller, spawner, ledger)
            assert sorted(p.name for p in target.iterdir()) == ["mine"]
            assert secret.read_bytes() == b"the caller's, beside the target"
        finally:
            fs.close()
    finally:
        spawner.close()
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_a_removed_targets_claim_refuses_no_new_directory(work: Path) -> None:
    """A progressive restore claims its target by (dev, inode) for as long as it runs. Its
    caller killed its helper and removed the empty target while the fetch went on; a new
    directory given the freed inode number (ext4 reuses them: here there are few) was then
    refused to every progressive restore as 'being filled by another', until the old
    restore ended. The daemon now holds the target open while it claims it: its number
    is not free to reuse."""
    sleeper = subprocess.Popen([*NOBODY_PREFIX, "sleep", "60"])
    spawner = Spawner()
    try:
        with small_ext4(work, 16 << 20, "-N", "32") as ext:
            os.chown(ext, NOBODY, NOBODY)
            wait_for(lambda: _uid_of(sleeper.pid) == NOBODY)
            caller = Caller(sleeper.pid, NOBODY, NOBODY, ())
            old = AsUser.start(caller, spawner)
            try:
                old.target(str(ext / "old"), False)
                old.begin([], [], progressive=True)  # ... and its fetch goes on
                old_ino = (ext / "old").stat().st_ino
                assert old.stopped()  # the caller kills its own helper,
                (ext / "old").rmdir()  # and removes its empty target
                made: list[Path] = []
                with contextlib.suppress(OSError):  # until ENOSPC: out of inodes
                    for i in range(64):
                        (ext / f"new{i}").mkdir()
                        os.chown(ext / f"new{i}", NOBODY, NOBODY)
                        made.append(ext / f"new{i}")
                # one of them would have the old number, were it free: every one takes a
                # progressive restore
                assert len(made) > 4
                for d in sorted(made, key=lambda d: d.stat().st_ino != old_ino)[:3]:
                    fresh = AsUser.start(caller, spawner)
                    try:
                        fresh.target(str(d), False)
                        fresh.begin([], [], progressive=True)
                    finally:
                        fresh.close()
            finally:
                old.close()
    finally:
        spawner.close()
        sleeper.kill()
        sleeper.wait()


# What each script below starts with: the modules they use, and libc's capget and capset
# with their structures (version 3).
_CAPS = r"""
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
class H(ctypes.Structure): _fields_ = [("v", ctypes.c_uint32), ("pid", ctypes.c_int)]
u32 = ctypes.c_uint32
class D(ctypes.Structure): _fields_ = [("e", u32), ("p", u32), ("i", u32)]
"""


def _as(uid: int) -> tuple[str, ...]:
    return ("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups")


@pytest.fixture
def cap_uid(request: pytest.FixtureRequest) -> int:
    """A uid of this test's own, that no user has: its processes holding capabilities make
    no other test's caller (nobody, or another test's uid, on the other worker) a writer."""
    return 61000 + zlib.crc32(request.node.nodeid.encode()) % 4000


def _fowner_script(script: str, uid: int) -> subprocess.Popen[str]:
    """`script` run as `uid` with CAP_FOWNER ambient (it survives the exec), its stdin and
    stdout piped."""
    caps = ("--inh-caps=+fowner", "--ambient-caps=+fowner")
    return subprocess.Popen(
        [*_as(uid), *caps, sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


# A process as nobody holding CAP_FOWNER (ambient, so it survives the exec): with "drop" it
# clears its effective set first, keeping the capability permitted (capset raises it again
# at will). It says "ready" once it is as the test wants it, then waits.
_CAPPED = (
    _CAPS
    + r"""
h, d = H(0x20080522, 0), (D * 2)()
assert libc.capget(ctypes.byref(h), d) == 0
if sys.argv[1] == "drop":
    d[0].e = d[1].e = 0
    assert libc.capset(ctypes.byref(h), d) == 0
print("ready", flush=True)
time.sleep(60)
"""
)


@contextlib.contextmanager
def _nobody_process(*args: str, uid: int, fowner: bool = False) -> Iterator[subprocess.Popen[str]]:
    caps = ("--inh-caps=+fowner", "--ambient-caps=+fowner") if fowner else ()
    proc = subprocess.Popen(
        [*_as(uid), *caps, sys.executable, "-c", _CAPPED, *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_caller_with_a_write_capability_only_permitted_is_a_writer(cap_uid: int) -> None:
    """CAP_FOWNER permitted but not effective: the caller raises it whenever it likes, then
    chmods a linked blob and writes through it (every later restore of that blob, anyone's,
    would hand out its bytes). So it is a writer: copies, no links."""
    from hostd.caller import could_write_cache

    with _nobody_process("drop", uid=cap_uid, fowner=True) as capped:
        status = Path(f"/proc/{capped.pid}/status").read_text()
        assert "CapEff:\t0000000000000000" in status
        assert could_write_cache(Caller(capped.pid, cap_uid, cap_uid, ()), os.geteuid())
    with _nobody_process("keep", uid=cap_uid) as plain:
        assert not could_write_cache(Caller(plain.pid, cap_uid, cap_uid, ()), os.geteuid())


def test_a_caller_whose_uid_runs_a_process_with_a_write_capability_is_a_writer(
    cap_uid: int,
) -> None:
    """The caller holds nothing, but another process of its uid does: the links would land
    in that uid's tree, where that process could write through them."""
    from hostd.caller import could_write_cache

    with _nobody_process("keep", uid=cap_uid) as plain:
        caller = Caller(plain.pid, cap_uid, cap_uid, ())
        assert not could_write_cache(caller, os.geteuid())
        with _nobody_process("keep", uid=cap_uid, fowner=True):
            assert could_write_cache(caller, os.geteuid())


# A process as nobody holding CAP_FOWNER (ambient), as one taking uid nobody holds root's
# capabilities between its setresuid and its exec; it lets every capability go (permitted
# too: it cannot raise them again) when told "drop", and says "dropped".
_TAKING = (
    _CAPS
    + r"""
print("ready", flush=True)
assert sys.stdin.readline() == "drop\n"
h, d = H(0x20080522, 0), (D * 2)()
assert libc.capset(ctypes.byref(h), d) == 0
print("dropped", flush=True)
sys.stdin.readline()
"""
)


def test_a_process_holding_a_write_capability_for_a_moment_of_its_change_of_uid_is_no_writer(
    monkeypatch: pytest.MonkeyPatch,
    cap_uid: int,
) -> None:
    """A process taking the caller's uid holds root's capabilities for a moment (setpriv, or a
    container runtime's init, between its setresuid and its exec): one that lets them go
    before the links exist could never write through them, so the caller is no writer (its
    link restore was refused, or copied, whenever another of its uid was starting). One that
    holds them on still makes it one (the test above)."""
    from hostd import caller as caller_module

    taking = _fowner_script(_TAKING, cap_uid)
    assert taking.stdin is not None
    assert taking.stdout is not None
    try:
        assert taking.stdout.readline() == "ready\n"
        assert "CapEff:\t0000000000000000" not in Path(f"/proc/{taking.pid}/status").read_text()
        paused: list[float] = []

        def pause(seconds: float) -> None:  # the scan saw it holding them: now it drops them
            assert taking.stdin is not None
            assert taking.stdout is not None
            if not paused:
                taking.stdin.write("drop\n")
                taking.stdin.flush()
                assert taking.stdout.readline() == "dropped\n"
            paused.append(seconds)

        monkeypatch.setattr(caller_module, "_pause", pause)
        with _nobody_process("keep", uid=cap_uid) as plain:
            assert not caller_module.could_write_cache(
                Caller(plain.pid, cap_uid, cap_uid, ()), os.geteuid()
            )
        assert len(paused) == 1  # looked at again once, after it had let them go
    finally:
        taking.kill()
        taking.wait()
        taking.stdin.close()
        taking.stdout.close()


# As nobody holding CAP_FOWNER (ambient): a reaper (PR_SET_CHILD_SUBREAPER) that lets every
# capability go once it has started the holder below it, which keeps them. Told "hand", the
# holder hands them on to a fresh pid (fork; its child says "handed"), then exits, and the
# reaper reaps it ("reaped"): at every moment a process of nobody holds CAP_FOWNER.
_HANDING = (
    _CAPS
    + r"""
assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
holder = os.fork()
if holder == 0:
    assert sys.stdin.readline() == "hand\n"
    if os.fork() == 0:
        os.write(1, b"handed\n")  # (one write: the reaper writes to the same pipe)
        sys.stdin.readline()
    os._exit(0)
h, d = H(0x20080522, 0), (D * 2)()
assert libc.capset(ctypes.byref(h), d) == 0
print("ready", holder, flush=True)
os.waitpid(holder, 0)
os.write(1, b"reaped\n")
os.wait()
"""
)


def test_a_write_capability_handed_on_to_a_fresh_pid_between_the_looks_still_makes_a_writer(
    monkeypatch: pytest.MonkeyPatch,
    cap_uid: int,
) -> None:
    """A process of the caller's uid holds CAP_FOWNER and, while the daemon looks again, hands
    it on to a child and exits (a fork-and-exit loop does so every few ms, forever): the
    process seen first is gone at the next look, yet one of that uid holds the capability
    throughout and can write through the links. Every look is at every process."""
    from hostd import caller as caller_module

    handing = _fowner_script(_HANDING, cap_uid)
    assert handing.stdin is not None
    assert handing.stdout is not None
    try:
        word, holder = handing.stdout.readline().split()
        assert word == "ready"
        assert "CapPrm:\t0000000000000000" in Path(f"/proc/{handing.pid}/status").read_text()
        assert "CapPrm:\t0000000000000000" not in Path(f"/proc/{holder}/status").read_text()
        paused: list[float] = []

        def pause(seconds: float) -> None:  # the scan saw the holder: it hands them on
            assert handing.stdin is not None
            assert handing.stdout is not None
            if not paused:
                handing.stdin.write("hand\n")
                handing.stdin.flush()
                said = sorted(handing.stdout.readline() for _ in range(2))
                assert said == ["handed\n", "reaped\n"]
                assert not Path(f"/proc/{holder}").exists()  # gone, not a zombie
            paused.append(seconds)

        monkeypatch.setattr(caller_module, "_pause", pause)
        with _nobody_process("keep", uid=cap_uid) as plain:
            assert caller_module.could_write_cache(
                Caller(plain.pid, cap_uid, cap_uid, ()), os.geteuid()
            )
        assert len(paused) == caller_module.HOLD_CHECKS
    finally:
        # its end of stdin closed, the holder there is exits and the reaper reaps it (one
        # killed instead would be left to pid 1, and a zombie still shows its capabilities)
        handing.stdin.close()
        try:
            handing.wait(timeout=30)
        finally:
            handing.kill()
            handing.wait()
            handing.stdout.close()


# As nobody holding CAP_FOWNER (ambient): a second thread keeps it, while the thread-group
# leader, which /proc/PID/status describes, lets every capability go. Credentials are per
# thread: the second one can chmod a blob linked to nobody, then write through it.
_THREADED = (
    _CAPS
    + r"""
started, done = threading.Event(), threading.Event()
def keep():
    started.set()
    done.wait()
threading.Thread(target=keep).start()
started.wait()
h, d = H(0x20080522, 0), (D * 2)()  # (pid 0: this thread only)
assert libc.capset(ctypes.byref(h), d) == 0
print("ready", flush=True)
sys.stdin.readline()
done.set()
"""
)


def test_a_thread_holding_a_write_capability_makes_a_writer_whatever_its_leader_holds(
    cap_uid: int,
) -> None:
    """A process of nobody's whose leader let CAP_FOWNER go but whose other thread holds it
    on: /proc/PID/status (the leader's) shows nothing, the thread's own status shows it. As
    the caller, or as another process of its uid, it makes the caller a writer."""
    from hostd.caller import could_write_cache

    threaded = _fowner_script(_THREADED, cap_uid)
    assert threaded.stdin is not None
    assert threaded.stdout is not None
    try:
        assert threaded.stdout.readline() == "ready\n"
        assert "CapPrm:\t0000000000000000" in Path(f"/proc/{threaded.pid}/status").read_text()
        tasks = [
            Path(t, "status").read_text() for t in Path(f"/proc/{threaded.pid}/task").iterdir()
        ]
        assert any("CapPrm:\t0000000000000008" in t for t in tasks)
        assert could_write_cache(Caller(threaded.pid, cap_uid, cap_uid, ()), os.geteuid())
        with _nobody_process("keep", uid=cap_uid) as plain:
            assert could_write_cache(Caller(plain.pid, cap_uid, cap_uid, ()), os.geteuid())
    finally:
        threaded.kill()
        threaded.wait()
        threaded.stdin.close()
        threaded.stdout.close()
