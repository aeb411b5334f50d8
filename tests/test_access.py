"""Who may ask for what (`[access]`), and how many operations run at once.

The decisions of hostd/access.py are tested on plain values. The rest drives a real daemon
running as root over its real Unix socket, with the client running as `nobody` (through
`setpriv`), as a container handed the socket would: the socket's directory is
opened to others and the socket made 0666, so `[access]` is all that stands between them.

The caps are tested with one operation held in flight by an HTTP origin whose chunk requests
wait at a gate the test opens (test_faults.HttpOrigin): no sleeps, waits poll with a deadline.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from harness import ROOT, Hostd, iter_events, make_tree, rmtree, short_tmp, toml_value
from test_faults import SMALL_CHUNK, HttpOrigin, publish_to, wait_for

from hostd import access
from hostd.caller import Caller
from hostd.config import AccessConfig
from hostd.errors import Busy, Forbidden

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid).gr_name
DEADLINE = 30.0


def config(**kw: Any) -> AccessConfig:
    values: dict[str, Any] = {
        "restore": ("*",),
        "publish": (),
        "admin": (),
        "link_to_writers": False,
        "max_operations": 64,
        "max_operations_per_uid": 16,
    }
    return AccessConfig(**{**values, **kw})


def caller(uid: int, gid: int | None = None, groups: tuple[int, ...] = ()) -> Caller:
    return Caller(pid=1234, uid=uid, gid=uid if gid is None else gid, groups=groups)


# -- decisions --------------------------------------------------------------------------------


def test_defaults_any_socket_user_restores_root_and_daemon_user_do_everything() -> None:
    cfg = config()
    everything = ("restore", "publish", "admin")
    assert access.classes(cfg, 0, caller(0)) == everything
    assert access.classes(cfg, 0, caller(1000)) == ("restore",)
    # a per-user daemon: its own user does everything, root too, others only restore
    assert access.classes(cfg, 1000, caller(1000)) == everything
    assert access.classes(cfg, 1000, caller(0)) == everything
    assert access.classes(cfg, 1000, caller(1001)) == ("restore",)


def test_root_and_daemon_user_cannot_be_locked_out() -> None:
    cfg = config(restore=())
    assert access.classes(cfg, 0, caller(0)) == ("restore", "publish", "admin")
    assert access.classes(cfg, 500, caller(500)) == ("restore", "publish", "admin")
    assert access.classes(cfg, 0, caller(1000)) == ()


def test_uid_and_gid_entries() -> None:
    cfg = config(restore=("uid:1000",), publish=("uid:1001", "gid:50"), admin=("gid:60",))
    assert access.classes(cfg, 0, caller(1000)) == ("restore",)
    assert access.classes(cfg, 0, caller(1001)) == ("publish",)
    # a gid entry matches the primary gid or any supplementary group
    assert access.classes(cfg, 0, caller(2000, gid=50)) == ("publish",)
    assert access.classes(cfg, 0, caller(2000, gid=7, groups=(3, 60))) == ("admin",)
    assert access.classes(cfg, 0, caller(2000, gid=50, groups=(60,))) == ("publish", "admin")
    # a uid entry never matches a gid of the same number, nor the other way round
    assert access.classes(cfg, 0, caller(2000, gid=1000, groups=(1001,))) == ()
    assert access.classes(cfg, 0, caller(50, gid=1)) == ()


def test_star_is_everyone() -> None:
    cfg = config(restore=(), publish=("*",))
    assert access.classes(cfg, 0, caller(4242, gid=4242)) == ("publish",)


def test_refusal_is_forbidden_naming_uid_and_class() -> None:
    with pytest.raises(Forbidden) as e:
        access.check(config(), 0, caller(65534), "publish")
    assert (e.value.code, e.value.status, e.value.exit_code) == ("forbidden", 403, 5)
    assert "uid 65534" in e.value.message
    assert "publish" in e.value.message
    with pytest.raises(Forbidden, match=r"uid 7 .*admin"):
        access.check(config(), 0, caller(7), "admin")
    access.check(config(), 0, caller(7), "restore")


def test_unknown_class_or_entry_is_a_bug_not_a_grant() -> None:
    with pytest.raises(ValueError, match="class"):
        access.allowed(config(), 0, caller(7), "everything")
    with pytest.raises(ValueError, match="entry"):
        access.allowed(config(publish=("user:nobody",)), 0, caller(7), "publish")


def test_operations_cap_per_uid_then_total() -> None:
    cfg = config(max_operations=3, max_operations_per_uid=2)
    ops = access.Operations()
    a1, a2 = ops.take(cfg, 1000), ops.take(cfg, 1000)
    with pytest.raises(Busy, match=r"uid 1000 .*max_operations_per_uid = 2") as e:
        ops.take(cfg, 1000)
    assert (e.value.code, e.value.status) == ("unavailable", 503)
    b1 = ops.take(cfg, 1001)
    with pytest.raises(Busy, match=r"max_operations = 3\)"):
        ops.take(cfg, 1002)
    assert (ops.total, dict(ops.by_uid)) == (3, {1000: 2, 1001: 1})
    ops.release(a1)
    ops.release(a1)  # a second release of one slot changes nothing
    assert (ops.total, dict(ops.by_uid)) == (2, {1000: 1, 1001: 1})
    ops.take(cfg, 1002)
    for slot in (a2, b1):
        ops.release(slot)
    assert (ops.total, dict(ops.by_uid)) == (1, {1002: 1})
    assert "total=1" in repr(ops)


# -- a real daemon as root, a client as nobody ----------------------------------------------


@pytest.fixture(autouse=True)
def _need_root(request: pytest.FixtureRequest) -> None:
    if "work" not in request.fixturenames:
        return
    if os.geteuid() != 0:
        why = "needs root: runs the daemon as root and the client as nobody"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)


@pytest.fixture
def work() -> Iterator[Path]:
    """A short directory under /tmp that nobody may pass through (not list or write)."""
    path = short_tmp("ha")
    path.chmod(0o711)
    yield path
    rmtree(path)


def daemon(root: Path, **kw: Any) -> Hostd:
    """A daemon whose socket nobody can reach: its directory passable, the socket 0666."""
    root.mkdir(mode=0o711)
    root.chmod(0o711)
    return Hostd(root, socket_mode="0666", **kw)


def as_nobody(*argv: str, groups: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run a command as nobody (its own group, plus `groups`), the way a container would."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    gids = ",".join(str(grp.getgrnam(g).gr_gid) for g in groups)
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY.pw_uid}",
            f"--regid={NOBODY.pw_gid}",
            f"--groups={gids}" if gids else "--clear-groups",
            *argv,
        ],
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cli(d: Hostd, *args: str, groups: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`hostd ARGS --socket <d's socket>` as nobody."""
    return as_nobody(sys.executable, "-m", "hostd", *args, "--socket", str(d.socket), groups=groups)


_API = """
import json, sys
from pathlib import Path
from harness import request
method, path, body = sys.argv[1], sys.argv[2], sys.argv[3]
status, out = request(Path(sys.argv[4]), method, path, json.loads(body) if body else None)
print(json.dumps([status, out]))
"""


def api(d: Hostd, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request on d's socket as nobody: (status, JSON body or text)."""
    done = as_nobody(
        sys.executable,
        "-c",
        _API,
        method,
        path,
        "" if body is None else json.dumps(body),
        str(d.socket),
    )
    assert done.returncode == 0, done.stderr
    status, out = json.loads(done.stdout)
    return status, out


def test_nobody_may_restore_class_but_not_publish_or_admin(work: Path) -> None:
    with daemon(work / "d") as d:
        done = cli(d, "status", "--json")
        assert done.returncode == 0, done.stderr
        who = json.loads(done.stdout)["caller"]
        assert who["uid"] == NOBODY.pw_uid
        assert who["gid"] == NOBODY.pw_gid
        assert who["classes"] == ["restore"]
        assert who["pid"] > 0
        done = cli(d, "status")
        assert f"uid {NOBODY.pw_uid} gid {NOBODY.pw_gid}: may restore" in done.stdout
        status, body = d.api("GET", "/v1/status")
        assert status == 200
        assert body["caller"]["uid"] == 0
        assert body["caller"]["classes"] == ["restore", "publish", "admin"]
        status, body = api(d, "GET", "/v1/snapshots")
        assert (status, body) == (200, {"snapshots": []})

        for args, cls in [
            (("publish", "/", "--ref", "x/y"), "publish"),
            (("gc",), "admin"),
            (("pin", "x/y"), "admin"),
            (("unpin", "x/y"), "admin"),
            (("verify",), "admin"),
        ]:
            done = cli(d, *args)
            assert done.returncode == 5, (args, done.stdout, done.stderr)
            assert "forbidden" in done.stderr
            assert f"uid {NOBODY.pw_uid}" in done.stderr
            assert cls in done.stderr
            assert done.stderr.count("\n") == 1, done.stderr

        # refused before the body is read: a body that is not even JSON still gets 403
        status, body = api(d, "POST", "/v1/publish", "not an object")
        assert status == 403, body
        assert body["error"] == "forbidden"
        assert f"uid {NOBODY.pw_uid}" in body["message"]
        assert "publish" in body["message"]
        # /metrics stays open to every socket user; unknown paths are still 404
        status, text = api(d, "GET", "/metrics")
        assert status == 200
        assert "hostd_" in text
        assert api(d, "POST", "/v1/nothing")[0] == 404
        # nothing nobody asked for was done or counted
        assert d.api("GET", "/v1/status")[1]["in_flight"] == 0


def test_granted_callers_get_past_access(work: Path) -> None:
    users = grp.getgrnam("users")  # a supplementary group nobody is given below
    cfg = {
        "restore": [f"group:{NOGROUP}"],  # nobody's primary group
        "publish": [f"uid:{NOBODY.pw_uid}"],
        "admin": ["group:users"],
    }
    with daemon(work / "d", access=cfg) as d:
        who = json.loads(cli(d, "status", "--json").stdout)["caller"]
        assert who["classes"] == ["restore", "publish"]
        # past access, the next check answers (no such directory): not a 403
        status, body = api(d, "POST", "/v1/publish", {"path": "/nonexistent/src", "ref": "x/y"})
        assert status != 403, body
        assert "forbidden" not in str(body)
        assert cli(d, "gc").returncode == 5
        # admin through a supplementary group, as SO_PEERGROUPS saw it at connect
        done = cli(d, "status", "--json", groups=("users",))
        who = json.loads(done.stdout)["caller"]
        assert users.gr_gid in who["groups"]
        assert who["classes"] == ["restore", "publish", "admin"]
        done = cli(d, "gc", "--json", groups=("users",))
        assert done.returncode == 0, done.stderr


# -- operation caps -----------------------------------------------------------------------------


@contextmanager
def held_prefetch(work: Path, caps: dict[str, int]) -> Iterator[tuple[Hostd, Callable[[], None]]]:
    """A daemon with `caps` in [access], demo/held prefetching by root and held at the origin's
    chunk gate, and demo/cached already in the cache. Yields the daemon and a function that
    hangs up the held prefetch."""
    origin = work / "origin"
    trees = {
        "demo/held": make_tree(work / "a", seed=1),
        "demo/cached": make_tree(work / "b", seed=2),
    }
    publish_to(origin, work / "pub", trees, chunk_size=SMALL_CHUNK)
    with HttpOrigin(origin) as http, daemon(work / "d", origin=http.url, access=caps) as d:
        stream: Generator[dict[str, Any], None, None] | None = None
        try:
            assert d.stream("/v1/prefetch", {"ref": "demo/cached"})["event"] == "result"
            http.gate(0)
            stream = cast(
                Generator[dict[str, Any], None, None],
                iter_events(d.socket, "/v1/prefetch", {"ref": "demo/held"}),
            )
            assert next(stream)["event"] == "progress"  # sends the request, reads one event
            wait_for("the held prefetch at the gate", lambda: http.waiting > 0)
            yield d, stream.close
        finally:
            if stream is not None:
                stream.close()
            http.gate(None)


def until_not_busy(call: Callable[[], tuple[int, Any]]) -> tuple[int, Any]:
    deadline = time.monotonic() + DEADLINE
    while True:
        status, body = call()
        if status != 503 or time.monotonic() > deadline:
            return status, body
        time.sleep(0.02)


def test_cap_per_uid_refuses_the_same_uid_and_lets_another_through(work: Path) -> None:
    with held_prefetch(work, {"max_operations_per_uid": 1}) as (d, hang_up):
        status, body = d.api("POST", "/v1/prefetch", {"ref": "demo/cached"})
        assert status == 503, body
        assert body["error"] == "unavailable"
        assert "uid 0" in body["message"]
        assert "max_operations_per_uid = 1" in body["message"]
        status, body = d.api("POST", "/v1/gc")
        assert status == 503, body
        # status and listings do no work and are not counted
        assert d.api("GET", "/v1/status")[0] == 200
        assert d.api("GET", "/v1/snapshots")[0] == 200
        # another uid has its own count
        done = cli(d, "prefetch", "demo/cached", "--json")
        assert done.returncode == 0, done.stderr

        hang_up()  # the client goes away: its place is given back
        status, body = until_not_busy(lambda: d.api("POST", "/v1/gc"))
        assert status == 200, body
        wait_for("no operation in flight", lambda: d.api("GET", "/v1/status")[1]["in_flight"] == 0)
        out = d.stream("/v1/prefetch", {"ref": "demo/cached"})
        assert out["event"] == "result", out


def test_cap_in_total_refuses_every_uid(work: Path) -> None:
    with held_prefetch(work, {"max_operations": 1}) as (d, hang_up):
        done = cli(d, "prefetch", "demo/cached")
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("hostd: hostd is busy: "), done.stderr
        assert "max_operations = 1" in done.stderr
        status, body = d.api("POST", "/v1/pin", {"ref": "demo/cached"})
        assert status == 503, body
        assert "max_operations = 1" in body["message"]
        hang_up()
        status, body = until_not_busy(
            lambda: api(d, "POST", "/v1/prefetch", {"ref": "demo/cached"})
        )
        assert status == 200, body


def reload_access(d: Hostd, rights: dict[str, Any]) -> None:
    """Write `rights` as d's [access], SIGHUP it, and wait until it says it reloaded."""
    lines = d.config_path.read_text().splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("access = "))
    lines[at] = f"access = {toml_value(rights)}"
    d.config_path.write_text("\n".join(lines) + "\n")
    before = d.log().count("config reloaded")
    d.signal(signal.SIGHUP)
    wait_for("the reload", lambda: d.log().count("config reloaded") > before)


def test_a_reload_lowers_a_cap_for_the_next_operation(work: Path) -> None:
    with held_prefetch(work, {"max_operations_per_uid": 16}) as (d, _):
        status, body = d.api("POST", "/v1/pin", {"ref": "demo/cached"})
        assert status == 200, body  # under the cap: root's held prefetch is one of 16
        reload_access(d, {"max_operations_per_uid": 1})
        status, body = d.api("POST", "/v1/pin", {"ref": "demo/cached"})
        assert status == 503, body
        assert "max_operations_per_uid = 1" in body["message"]


def test_a_reload_grants_and_revokes_at_once(work: Path) -> None:
    """`systemctl reload` after editing [access]: the next request is judged by the new
    lists and caps (a revoked caller is refused without a restart), on the loop's routes and
    the desk's status alike; link_checks, which needs a restart, is said to need one."""
    with daemon(work / "d", access={"restore": []}) as d:

        def reload(**rights: Any) -> None:
            reload_access(d, rights)

        def classes() -> list[str]:
            """What `hostd status` tells nobody it may do (status is a restore operation)."""
            done = cli(d, "status", "--json")
            if done.returncode == 5:
                assert "[access] restore" in done.stderr, done.stderr
                return []
            assert done.returncode == 0, done.stderr
            return list(json.loads(done.stdout)["caller"]["classes"])

        assert api(d, "GET", "/v1/snapshots")[0] == 403
        assert classes() == []

        reload(restore=["*"], publish=["user:nobody"])
        assert api(d, "GET", "/v1/snapshots") == (200, {"snapshots": []})
        assert classes() == ["restore", "publish"]
        assert f"[access] now restore=* publish=uid:{NOBODY.pw_uid} admin=-" in d.log()

        # the caps too (read from the same place by every request)
        reload(restore=["*"], max_operations_per_uid=1, max_operations=2)
        assert "max_operations=2 max_operations_per_uid=1 link_to_writers=false" in d.log()

        reload(restore=[], link_checks="all")
        assert api(d, "GET", "/v1/snapshots")[0] == 403  # revoked, with no restart
        assert classes() == []
        assert "'access.link_checks' changed; it takes effect when hostd restarts" in d.log()
