"""One daemon per cache, and a private cache (issue 9, items 4 and 11).

Real daemons (tests/harness.py) on real tiers: a second `hostd serve` on the same tiers or
index, under any spelling of their paths (the same config, another socket, a symlink, a bind
mount in its own mount namespace, the per-user default tiers) exits 1 naming the holder and
changes nothing; the lock dies with its holder, SIGKILL included. The cache's directories are
0700: an unprivileged process reads no blob and lists no tier, while the daemon serves on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from harness import Hostd, make_tree, rmtree, short_tmp, tree_digest, write_config

from hostd.config import load_config
from hostd.lock import CacheLocked, CacheLocks

NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]


@pytest.fixture
def work() -> Iterator[Path]:
    root = short_tmp("lk")
    try:
        yield root
    finally:
        rmtree(root)


def need_root(*tools: str) -> None:
    why = None
    if os.geteuid() != 0:
        why = "needs root (another uid, mounts in a private mount namespace)"
    elif missing := [t for t in tools if not shutil.which(t)]:
        why = f"needs {', '.join(missing)} (util-linux)"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)


def serve_once(
    config: Path, env: Mapping[str, str], wrap: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `hostd serve` that is expected to refuse to start: its exit code and output."""
    return subprocess.run(
        [*(wrap or []), sys.executable, "-m", "hostd", "serve", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def snapshot_state(d: Hostd) -> dict[str, Any]:
    """What a second daemon must not change: the index files, the tiers' files, the socket."""
    out: dict[str, Any] = {}
    state = d.root / "state"
    for p in sorted(state.iterdir()):
        if p.is_file():
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    for t in d.tiers:
        for dirpath, _, files in os.walk(t["path"]):
            for name in files:
                p = Path(dirpath) / name
                out[str(p)] = (p.stat().st_mtime_ns, p.read_bytes())
    out["socket"] = os.stat(d.socket).st_ino
    return out


def assert_refused(done: subprocess.CompletedProcess[str], holder: Hostd, what: str) -> None:
    assert done.returncode == 1, done
    assert holder.proc is not None
    assert f"{what} " in done.stderr, done.stderr
    assert f"locked by another hostd (pid {holder.proc.pid}, socket {holder.socket})" in (
        done.stderr
    ), done.stderr


def assert_serves(d: Hostd, tree: Path, ref: str, target: Path) -> None:
    status, _ = d.api("GET", "/v1/status")
    assert status == 200
    out = d.restore(ref, target, mode="copy")
    assert out["event"] == "result", out
    assert tree_digest(target) == tree_digest(tree)


def test_second_daemon_on_the_same_config_changes_nothing(work: Path) -> None:
    tree = make_tree(work / "src")
    with Hostd(work / "a") as a:
        a.publish(tree, "m/one")
        # A file in tmp/ stands for a fill of the first daemon in flight: the sweep that a
        # second daemon used to do at start removed such files under it.
        scratch = Path(a.tiers[0]["path"]) / "tmp" / "fill-in-flight"
        scratch.write_bytes(b"half a blob")
        before = snapshot_state(a)
        done = serve_once(a.config_path, a.env)
        assert_refused(done, a, "tier 'mem'")
        assert snapshot_state(a) == before
        assert scratch.read_bytes() == b"half a blob"
        assert_serves(a, tree, "m/one", work / "out")
        lock = json.loads((Path(a.tiers[1]["path"]) / ".lock").read_text())
        assert a.proc is not None
        assert lock == {"pid": a.proc.pid, "socket": str(a.socket)}


def test_another_socket_is_no_way_around_the_lock(work: Path) -> None:
    tree = make_tree(work / "src")
    with Hostd(work / "a") as a:
        a.publish(tree, "m/one")
        before = snapshot_state(a)
        # The same config but its socket: every tier and the index are a's.
        b = Hostd(work / "b", tiers=a.tiers, index=str(a.root / "state" / "index.sqlite3"))
        assert_refused(serve_once(b.config_path, b.env), a, "tier 'mem'")
        # Tiers of its own, a's index: the index's lock stops it.
        c = Hostd(work / "c", index=str(a.root / "state" / "index.sqlite3"))
        assert_refused(serve_once(c.config_path, c.env), a, "index")
        assert not b.socket.exists()
        assert not c.socket.exists()
        assert snapshot_state(a) == before
        assert_serves(a, tree, "m/one", work / "out")


def test_a_symlink_to_a_tier_is_the_same_tier(work: Path) -> None:
    tree = make_tree(work / "src")
    with Hostd(work / "a") as a:
        a.publish(tree, "m/one")
        before = snapshot_state(a)
        (work / "b").mkdir()
        os.symlink(a.tiers[1]["path"], work / "b" / "disk-link")
        b = Hostd(
            work / "b",
            tiers=[
                {"name": "mem", "path": str(work / "b" / "mem"), "budget": "1GiB"},
                {"name": "disk", "path": str(work / "b" / "disk-link"), "budget": "1GiB"},
            ],
        )
        assert_refused(serve_once(b.config_path, b.env), a, "tier 'disk'")
        assert snapshot_state(a) == before
        assert_serves(a, tree, "m/one", work / "out")


def test_a_bind_mount_of_a_tier_is_the_same_tier(work: Path) -> None:
    need_root("unshare", "mount")
    tree = make_tree(work / "src")
    with Hostd(work / "a") as a:
        a.publish(tree, "m/one")
        before = snapshot_state(a)
        bound = work / "b" / "bound"
        bound.mkdir(parents=True)
        b = Hostd(
            work / "b",
            tiers=[{"name": "disk", "path": str(bound), "budget": "1GiB"}],
        )
        # The mount lives only in b's private mount namespace: nothing is mounted on the host.
        wrap = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"']
        wrap += [a.tiers[1]["path"], str(bound)]
        assert_refused(serve_once(b.config_path, b.env, wrap), a, "tier 'disk'")
        assert list(bound.iterdir()) == []  # the host never saw the mount
        assert snapshot_state(a) == before
        assert_serves(a, tree, "m/one", work / "out")


def test_the_lock_dies_with_its_holder(work: Path) -> None:
    tree = make_tree(work / "src")
    a = Hostd(work / "a")
    try:
        a.start()
        a.publish(tree, "m/one")
        assert a.proc is not None
        killed = a.proc.pid
        a.signal(signal.SIGKILL)
        assert a.wait() == -signal.SIGKILL
        # The lock files and the socket stay behind; the next daemon takes them over.
        mem_lock = Path(a.tiers[0]["path"]) / ".lock"
        assert json.loads(mem_lock.read_text())["pid"] == killed
        assert a.socket.exists()
        a.start()
        assert a.proc is not None
        assert json.loads(mem_lock.read_text()) == {"pid": a.proc.pid, "socket": str(a.socket)}
        assert_serves(a, tree, "m/one", work / "out")
        # A clean stop releases them too: a daemon on a's tiers and index with another socket
        # starts once a has gone.
        a.close()
        assert a.wait() == 0
    finally:
        a.close()
    b = Hostd(
        work / "b",
        origin=f"file://{a.root}/origin",
        tiers=a.tiers,
        index=str(a.root / "state" / "index.sqlite3"),
    )
    with b:
        assert_serves(b, tree, "m/one", work / "out2")


def test_two_places_of_one_config_that_are_one_directory(tmp_path: Path) -> None:
    d = tmp_path / "tier"
    d.mkdir()
    os.symlink(d, tmp_path / "link")
    sock = tmp_path / "s.sock"
    with pytest.raises(CacheLocked, match="same directory as tier 'a'"):
        CacheLocks.take([("tier 'a'", d), ("tier 'b'", tmp_path / "link")], sock)
    # the refusal released what it had taken
    locks = CacheLocks.take([("tier 'a'", d)], sock)
    locks.release()


def test_the_cache_is_private(work: Path) -> None:
    need_root("setpriv")
    work.chmod(0o755)  # let nobody walk up to the daemon's directories
    root = work / "a"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    # Directories left 0755 by an older version are made private at start.
    for sub in ("mem/blobs", "mem/tmp", "disk/partial", "state/manifests"):
        (root / sub).mkdir(parents=True, mode=0o755)
    tree = make_tree(work / "src")
    with Hostd(root) as a:
        a.publish(tree, "m/one")
        (root / "readable").write_text("control")
        (root / "readable").chmod(0o644)
        dirs = [root / "state", root / "state" / "manifests"]
        for t in a.tiers:
            dirs += [Path(t["path"]) / s for s in ("", "blobs", "partial", "tmp")]
        for d in dirs:
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        blobs = [b for t in a.tiers for b in sorted(Path(t["path"]).glob("blobs/*/*"))]
        assert blobs

        def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*NOBODY, *cmd], capture_output=True, text=True, timeout=30, check=False
            )

        assert as_nobody("cat", str(root / "readable")).stdout == "control"  # the control
        for b in blobs:
            done = as_nobody("cat", str(b))
            assert done.returncode != 0, done
            assert "Permission denied" in done.stderr, done
        for t in a.tiers:
            done = as_nobody("ls", t["path"])
            assert done.returncode != 0, done
            assert "Permission denied" in done.stderr, done
        done = as_nobody("ls", str(root / "state"))
        assert done.returncode != 0, done
        assert "Permission denied" in done.stderr, done
        assert_serves(a, tree, "m/one", work / "out")


def test_default_tiers_are_logged_and_locked(work: Path) -> None:
    home = work / "home"
    env = {
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_RUNTIME_DIR": str(work / "run"),
    }
    daemons = [Hostd(work / name, env=env) for name in ("a", "b")]
    for d in daemons:  # configs of their own, with no [[tiers]]
        values = {
            "origin": f"file://{work}/origin",
            "socket": str(d.socket),
            "index": str(d.root / "state" / "index.sqlite3"),
            "metrics_address": "127.0.0.1:0",
        }
        write_config(d.config_path, values, [])
    a, b = daemons
    config = load_config(a.config_path, env)
    assert config.tiers_default
    assert [t.path for t in config.tiers] == [t.path for t in load_config(b.config_path, env).tiers]
    try:
        tree = make_tree(work / "src")
        with a:
            a.publish(tree, "m/one")
            assert "no [[tiers]] in the config: using the per-user default tiers" in a.log()
            done = serve_once(b.config_path, b.env)
            assert_refused(done, a, f"tier {config.tiers[0].name!r}")
            assert not b.socket.exists()
            assert_serves(a, tree, "m/one", work / "out")
    finally:
        for t in config.tiers:
            rmtree(t.path)  # the mem tier lies in /dev/shm, outside work


def test_tiers_from_the_file_are_not_default(work: Path) -> None:
    d = Hostd(work / "a")
    assert not load_config(d.config_path, d.env).tiers_default
