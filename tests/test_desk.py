"""The socket's desk (hostd/desk.py): `GET /v1/status` answered off the event loop, every
other request handed to the loop as it came, against a real daemon. Both desks: the native
one (native/desk.c) and its Python twin (`implementation`), each against the same tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import pwd
import random
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from harness import HeldOrigin, Hostd, make_tree, request, rmtree, short_tmp, stream

from hostd import daemon, desk
from hostd.config import load_config
from hostd.daemon import serve

IMPLEMENTATIONS = ["native", "python"]


def native_missing() -> str | None:
    """Why the native desk cannot be tested here (under CI=true it must be)."""
    if desk.WHY_NOT_NATIVE and os.environ.get("CI") != "true":
        return desk.WHY_NOT_NATIVE
    return None


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which desk: in this process (desk.NATIVE), and in a daemon started with `env_of`."""
    kind: str = request.param
    if kind == "native" and (why := native_missing()):
        pytest.skip(why)
    monkeypatch.setattr(desk, "NATIVE", kind == "native")
    return kind


def env_of(implementation: str) -> dict[str, str]:
    """A daemon's environment for `implementation` (HOSTD_NATIVE=0 takes every twin)."""
    return {"HOSTD_NATIVE": "1" if implementation == "native" else "0"}


@pytest.fixture
def work() -> Iterator[Path]:
    root = short_tmp("dk")
    root.chmod(0o711)  # nobody may pass through to a socket
    try:
        yield root
    finally:
        rmtree(root)


def exchange(sock: Path, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` on a fresh connection and read until the daemon closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(data)
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
    return bytes(out)


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP/1.1 responses in `raw`, one after another (Content-Length bodies only)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        n = int(headers["content-length"])
        out.append((status, headers, rest[:n]))
        raw = rest[n:]
    return out


GET_STATUS = b"GET /v1/status HTTP/1.1\r\nHost: hostd\r\nConnection: close\r\n\r\n"


def by_desk(headers: dict[str, str]) -> bool:
    """The desk's answers carry no Server header; aiohttp's always do."""
    return "server" not in headers


# -- what the desk takes, and what it leaves to the loop -------------------------------------


@pytest.mark.parametrize(
    ("head", "keep"),
    [
        (b"GET /v1/status HTTP/1.1\r\nHost: x", True),
        (b"GET /v1/status?x=1 HTTP/1.1\r\nHost: x\r\nAccept: */*", True),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close", False),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nconnection: Keep-Alive, Close", False),
        (b"GET /v1/status HTTP/1.0", False),
        (b"GET /v1/status HTTP/1.0\r\nHost: x", False),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 0", True),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nUser-Agent:  curl/8 (x; y)\t", True),
        (b"GET /v1/status HTTP/1.1", None),  # no Host
        (b"GET /v1/status HTTP/1.1\r\nHost: a\r\nHost: b", None),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 2", None),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", None),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nExpect: 100-continue", None),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nUpgrade: websocket", None),
        (b"GET /v1/status HTTP/2.0\r\nHost: x", None),
        (b"GET /v1/statusx HTTP/1.1\r\nHost: x", None),
        (b"GET /v1/status/ HTTP/1.1\r\nHost: x", None),
        (b"GET /v1/status?\x01 HTTP/1.1\r\nHost: x", None),
        (b"HEAD /v1/status HTTP/1.1\r\nHost: x", None),
        (b"POST /v1/status HTTP/1.1\r\nHost: x", None),
        (b"GET  /v1/status HTTP/1.1\r\nHost: x", None),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nbad header line", None),
        (b"GET /v1/status HTTP/1.1\r\nHost : x", None),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\n: empty name", None),
        (b"GET /v1/status HTTP/1.1\r\nHost: a\x00b", None),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX: y\nContent-Length: 5", None),
        (b"GET /v1/status HTTP/1.1\r\nHost: x\r\n folded", None),
    ],
)
def test_the_desk_takes_only_plain_status_requests(
    head: bytes, keep: bool | None, implementation: str
) -> None:
    assert reader(implementation)(head) == keep


def reader(implementation: str) -> Callable[[bytes], bool | None]:
    """The desk's reading of a request head, as `implementation` does it."""
    if implementation == "python":
        return desk._status_request
    from hostd import _desk

    return _desk.status_request


# Pieces of heads, plain and odd, that random heads are made of.
_PIECES = [
    b"GET /v1/status",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b"?a=1",
    b"?",
    b"\r\n",
    b"\n",
    b"\r",
    b"Host: h",
    b"host:x",
    b"Connection: close",
    b"Connection: keep-alive, Close ",
    b"connection:\tclose\t",
    b"Content-Length: 0",
    b"Content-Length: 00",
    b"Transfer-Encoding: chunked",
    b"Expect: 100-continue",
    b"Upgrade: h2c",
    b"X-A: b c",
    b"X-A:",
    b": v",
    b" folded",
    b"\t",
    b" ",
    b"\x00",
    b"\x7f",
    b"\xff",
    b"\x01",
    b"GET",
    b"HTTP/1.1",
    b":",
    b",",
]


def random_head(rng: random.Random) -> bytes:
    """A head (no blank line) made of pieces: most start as a status request does."""
    parts = [b"GET /v1/status HTTP/1.1\r\nHost: h"] if rng.random() < 0.7 else []
    for _ in range(rng.randrange(0, 12)):
        parts.append(rng.choice(_PIECES))
        if rng.random() < 0.5:
            parts.append(b"\r\n")
    return b"".join(parts).replace(b"\r\n\r\n", b"\r\n")


def test_both_desks_read_every_head_alike() -> None:
    """The native reading against the twin's regular expressions, on random heads."""
    if why := native_missing():
        pytest.skip(why)
    native, twin = reader("native"), reader("python")
    rng = random.Random(11)
    taken = 0
    for _ in range(20000):
        head = random_head(rng)
        assert native(head) == twin(head), head
        taken += twin(head) is not None
    assert taken > 1000  # the mix reaches both answers


def test_a_head_of_many_lines_is_the_loops() -> None:
    """The native desk takes a head of at most MAX_HEADERS lines: a longer one is the loop's
    to read (the twin has no such bound)."""
    if why := native_missing():
        pytest.skip(why)
    from hostd import _desk

    def head(n: int) -> bytes:
        return b"GET /v1/status HTTP/1.1\r\nHost: h" + b"".join(
            b"\r\nX-%d: y" % i for i in range(n - 1)
        )

    assert reader("native")(head(_desk.MAX_HEADERS)) is True
    assert reader("native")(head(_desk.MAX_HEADERS + 1)) is None


# -- a daemon in this process, so a test can block its loop ---------------------------------


@asynccontextmanager
async def daemon_here(root: Path) -> AsyncIterator[Hostd]:
    """A daemon served on this test's event loop (Hostd only writes its config here)."""
    h = Hostd(root)
    shutdown = asyncio.Event()
    task = asyncio.ensure_future(serve(load_config(h.config_path, h.env), shutdown=shutdown))
    try:
        deadline = time.monotonic() + 30
        while not h.socket.exists() or not await _answers(h.socket):
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, "the daemon did not start"
            await asyncio.sleep(0.02)
        yield h
    finally:
        shutdown.set()
        await asyncio.wait_for(task, 30)


async def _answers(sock: Path) -> bool:
    try:
        return (await asyncio.to_thread(request, sock, "GET", "/v1/status", None, 2))[0] == 200
    except OSError:
        return False


def block_loop(seconds: float) -> None:
    """Called ON the loop: it runs nothing for `seconds` (the stall a long step makes)."""
    time.sleep(seconds)


def ask_while_blocked(sock: Path, data: bytes) -> bytes:
    """Called ON the loop, blocking it: `data`'s answer, asked from another thread."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(exchange, sock, data).result(10)


async def test_status_is_answered_while_the_loop_is_blocked(
    work: Path, implementation: str
) -> None:
    async with daemon_here(work / "d") as h:
        raw = ask_while_blocked(h.socket, GET_STATUS)  # the loop runs nothing meanwhile
        [(status, headers, body)] = responses(raw)
        assert status == 200
        assert by_desk(headers)
        doc = json.loads(body)
        assert doc["pid"] == os.getpid()
        assert doc["in_flight"] == 0
        assert doc["caller"]["uid"] == os.geteuid()
        assert doc["caller"]["classes"] == ["restore", "publish", "admin"]

        # A rendering the loop could not refresh says how old it is.
        block_loop(desk.STALE_AFTER + 0.2)
        stale = json.loads(responses(ask_while_blocked(h.socket, GET_STATUS))[0][2])
        assert stale["status_age"] >= desk.STALE_AFTER + 0.2
        assert stale["uptime"] >= doc["uptime"] + desk.STALE_AFTER + 0.2  # the desk's clock

        # Once the loop runs again it renders afresh, and it answers what the desk hands on.
        deadline = time.monotonic() + 10
        while (await asyncio.to_thread(request, h.socket, "GET", "/v1/status"))[1][
            "status_age"
        ] > desk.STALE_AFTER:
            assert time.monotonic() < deadline, "the status was never rendered again"
        status, snaps = await asyncio.to_thread(request, h.socket, "GET", "/v1/snapshots")
        assert (status, snaps) == (200, {"snapshots": []})


async def test_a_failed_desk_leaves_the_socket_to_the_loop(
    work: Path, implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The desk is handed a socket that is bound but not listening: its accept fails
    (EINVAL), as no request can make it fail. The loop then listens and accepts itself, and
    nothing goes unanswered."""

    def bound_only(path: Path, mode: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, mode)
        return sock

    monkeypatch.setattr(daemon, "listen_unix", bound_only)
    async with daemon_here(work / "d") as h:
        for _ in range(3):
            raw = await asyncio.to_thread(exchange, h.socket, GET_STATUS)
            [(status, headers, body)] = responses(raw)
            assert status == 200
            assert not by_desk(headers)  # the loop's answer
            assert json.loads(body)["status_age"] == 0.0


def wait_handed(front: desk.Desk | desk.NativeDesk, handed: int) -> None:
    """Called ON the loop, blocking it: until the desk has handed `handed` connections over."""
    deadline = time.monotonic() + 10
    while front.handed < handed:
        assert time.monotonic() < deadline, "the desk never handed the request over"
        time.sleep(0.005)


async def test_a_rendering_that_fails_loses_no_connection(
    work: Path, implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rendering the desk asks for that raises must not take the connections handed over
    beside it down with it: each is still answered."""
    failing = False
    status = daemon.Daemon.status

    def render(self: daemon.Daemon) -> dict[str, Any]:
        if failing:
            raise RuntimeError("rendering failed")
        return status(self)

    desks: list[desk.Desk | desk.NativeDesk] = []

    def kind() -> Callable[..., desk.Desk | desk.NativeDesk]:
        def keep(*args: Any) -> desk.Desk | desk.NativeDesk:
            desks.append(desk.desk_kind()(*args))
            return desks[-1]

        return keep

    monkeypatch.setattr(daemon.Daemon, "status", render)
    monkeypatch.setattr(daemon, "desk_kind", kind)
    get = b"GET /v1/snapshots HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    async with daemon_here(work / "d") as h:
        [front] = desks
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            failing = True
            # On the loop, blocking it: a status past STALE_AFTER (the desk asks the loop
            # for a rendering), then a request the desk hands over, both waiting for it.
            block_loop(desk.STALE_AFTER + 0.1)
            handed = front.handed
            assert responses(ask_while_blocked(h.socket, GET_STATUS))[0][0] == 200
            other = pool.submit(exchange, h.socket, get, 10)
            wait_handed(front, handed + 1)
            raw = await asyncio.wrap_future(other)  # the loop runs again: the rendering fails
            failing = False
        [(code, _, body)] = responses(raw)
        assert (code, json.loads(body)) == (200, {"snapshots": []})


# -- a real daemon process --------------------------------------------------------------------


def test_the_desk_answers_a_status_as_current_as_the_last_operation(
    work: Path, implementation: str
) -> None:
    src = make_tree(work / "src")
    origin_dir = work / "origin"
    with Hostd(work / "p", origin=f"file://{origin_dir}", pack_size=0) as p:
        sid = p.publish(src, "desk/now", chunk_size=64 * 1024)["snapshot"]
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        HeldOrigin(origin_dir, gated=True) as http,
        Hostd(work / "d", origin=http.url, env=env_of(implementation)) as d,
    ):
        [(_, headers, body)] = responses(exchange(d.socket, GET_STATUS))
        assert by_desk(headers)
        assert json.loads(body)["in_flight"] == 0
        target = str(work / "o")
        running = pool.submit(stream, d.socket, "/v1/restore", {"ref": sid, "target": target})
        try:
            assert http.first.wait(20), "the restore never asked the origin for a chunk"
            [(_, headers, body)] = responses(exchange(d.socket, GET_STATUS))
            assert by_desk(headers)
            assert json.loads(body)["in_flight"] == 1  # at once, not a quarter second later
        finally:
            http.gate.set()
        assert running.result(60)[-1]["event"] == "result"
        [(_, headers, body)] = responses(exchange(d.socket, GET_STATUS))
        assert by_desk(headers)
        doc = json.loads(body)
        assert doc["in_flight"] == 0
        assert doc["snapshots"] == 1
        assert doc["tiers"][0]["blobs"] > 0


def test_the_connection_goes_on_after_a_status(work: Path, implementation: str) -> None:
    with Hostd(work / "d", env=env_of(implementation)) as d:
        # pipelined: both answered, in order (the loop's: the desk takes only a lone head)
        two = (
            b"GET /v1/status HTTP/1.1\r\nHost: hostd\r\n\r\n"
            b"GET /v1/snapshots HTTP/1.1\r\nHost: hostd\r\nConnection: close\r\n\r\n"
        )
        (s1, _, b1), (s2, _, b2) = responses(exchange(d.socket, two))
        assert (s1, s2) == (200, 200)
        assert json.loads(b1)["in_flight"] == 0
        assert json.loads(b2) == {"snapshots": []}
        # one kept-alive connection, three status requests one after another, all the desk's
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(d.socket))
            for _ in range(3):
                s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: hostd\r\n\r\n")
                raw = b""
                while not (got := responses_if_whole(raw)):
                    chunk = s.recv(65536)
                    assert chunk, "the daemon closed a kept-alive connection"
                    raw += chunk
                assert got[0][0] == 200
                assert by_desk(got[0][1])
        # HTTP/1.0: answered, then closed
        [(status, headers, _)] = responses(exchange(d.socket, b"GET /v1/status HTTP/1.0\r\n\r\n"))
        assert status == 200
        assert headers["connection"] == "close"


def responses_if_whole(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return []
    n = next(
        int(v)
        for k, _, v in (x.partition(b":") for x in head.split(b"\r\n")[1:])
        if k.lower() == b"content-length"
    )
    return responses(raw) if len(rest) >= n else []


def test_what_the_desk_does_not_take_the_loop_answers(work: Path, implementation: str) -> None:
    with Hostd(work / "d", env=env_of(implementation)) as d:
        cases: list[tuple[bytes, int]] = [
            (b"POST /v1/status HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 405),
            (b"GET /v1/statusx HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 404),
            (
                b"GET /v1/status HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n"
                b"Connection: close\r\n\r\n{}",
                200,
            ),
            (b"GET /v1/status?verbose=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", 200),
        ]
        for data, want in cases:
            [(status, _, body)] = responses(exchange(d.socket, data))
            assert status == want, (data, body)
        # a malformed head is the loop's to refuse, with its own 400
        raw = exchange(d.socket, b"GET /v1/status HTTP/1.1\r\nbad line\r\n\r\n")
        assert raw.split(b" ", 2)[1] == b"400", raw[:200]


def test_idle_and_trickling_connections_do_not_hold_up_a_status(
    work: Path, implementation: str
) -> None:
    with Hostd(work / "d", env=env_of(implementation)) as d:
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(50)]
        trickle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for s in [*idle, trickle]:
                s.connect(str(d.socket))
            trickle.sendall(b"GET /v1/sta")
            started = time.monotonic()
            status, doc = request(d.socket, "GET", "/v1/status", timeout=5)
            assert status == 200
            assert doc["in_flight"] == 0
            # the trickled head, finished after the desk gave it to the loop, is still answered
            time.sleep(desk.HAND_OVER_AFTER * 2)
            trickle.settimeout(10)
            trickle.sendall(b"tus HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := trickle.recv(65536):
                raw += chunk
            [(status, headers, body)] = responses(raw)
            assert status == 200
            assert not by_desk(headers)  # the loop's answer: the same document
            assert set(json.loads(body)) == set(doc)
            assert time.monotonic() - started < 10
        finally:
            for s in [*idle, trickle]:
                s.close()
        d.signal(signal.SIGTERM)
        assert d.wait(30) == 0


def test_a_caller_who_may_not_ask_gets_the_loops_403(work: Path, implementation: str) -> None:
    nobody = pwd.getpwnam("nobody")
    root = work / "d"
    root.mkdir(mode=0o711)
    root.chmod(0o711)
    with Hostd(
        root, socket_mode="0666", access={"restore": ["uid:1"]}, env=env_of(implementation)
    ) as d:
        done = subprocess.run(
            [
                "setpriv",
                f"--reuid={nobody.pw_uid}",
                f"--regid={nobody.pw_gid}",
                "--clear-groups",
                "curl",
                "-s",
                "-w",
                "\n%{http_code}",
                "--unix-socket",
                str(d.socket),
                "http://hostd/v1/status",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        body, _, code = done.stdout.rpartition("\n")
        assert code == "403", done
        err: dict[str, Any] = json.loads(body)
        assert err["error"] == "forbidden"
        assert f"uid {nobody.pw_uid}" in err["message"]


def status_as(
    sock: Path, uid: int, gid: int, groups: list[int], path: str = "/v1/status"
) -> tuple[int, bool, Any]:
    """`GET path` (the status) asked with curl as another user: (HTTP code, whether the desk
    answered, the body's JSON)."""
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
            "curl",
            "-s",
            "-i",
            "--unix-socket",
            str(sock),
            f"http://hostd{path}",
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )
    [(code, headers, body)] = responses(done.stdout)
    return code, by_desk(headers), json.loads(body)


def test_the_desk_lets_in_whom_access_lists(work: Path, implementation: str) -> None:
    """Callers `[access] restore` lists by uid, by primary or supplementary group, or by "*"
    get the desk's own answer, which says who they are and what they may do; others get
    the loop's 403."""
    nobody = pwd.getpwnam("nobody")
    other = nobody.pw_gid + 1000  # a group nobody is not in
    root = work / "d"
    root.mkdir(mode=0o711)
    root.chmod(0o711)
    listed = {"restore": [f"gid:{other}", "uid:4242"], "publish": [f"gid:{other}"]}
    with Hostd(root, socket_mode="0666", access=listed, env=env_of(implementation)) as d:
        code, desk_answered, doc = status_as(d.socket, nobody.pw_uid, nobody.pw_gid, [other])
        assert (code, desk_answered) == (200, True)
        assert doc["caller"] == {
            "pid": doc["caller"]["pid"],
            "uid": nobody.pw_uid,
            "gid": nobody.pw_gid,
            "groups": [other],
            "classes": ["restore", "publish"],
        }
        assert doc["caller"]["pid"] > 0
        code, desk_answered, doc = status_as(d.socket, 4242, other, [])  # uid; gid primary
        assert (code, desk_answered, doc["caller"]["classes"]) == (
            200,
            True,
            ["restore", "publish"],
        )
        code, desk_answered, doc = status_as(d.socket, nobody.pw_uid, nobody.pw_gid, [])
        assert (code, desk_answered, doc["error"]) == (403, False, "forbidden")
    with Hostd(root, socket_mode="0666", env=env_of(implementation)) as d:  # restore: "*"
        code, desk_answered, doc = status_as(d.socket, nobody.pw_uid, nobody.pw_gid, [])
        assert (code, desk_answered, doc["caller"]["classes"]) == (200, True, ["restore"])


def test_a_caller_in_hundreds_of_groups_is_told_who_it_is(work: Path, implementation: str) -> None:
    """SO_PEERGROUPS of a caller in more than 256 groups needs more than the 1024 bytes that
    Python's socket.getsockopt allows: the loop must still tell who is calling, as the
    native desk does, not answer 403 ("cannot tell who is calling")."""
    nobody = pwd.getpwnam("nobody")
    groups = [100000 + i for i in range(300)]
    root = work / "d"
    root.mkdir(mode=0o711)
    root.chmod(0o711)
    listed = {"restore": [f"gid:{groups[-1]}"]}
    with Hostd(root, socket_mode="0666", access=listed, env=env_of(implementation)) as d:
        code, _, doc = status_as(d.socket, nobody.pw_uid, nobody.pw_gid, groups)
        assert code == 200, doc
        assert (doc["caller"]["groups"], doc["caller"]["classes"]) == (groups, ["restore"])
        code, _, doc = status_as(d.socket, nobody.pw_uid, nobody.pw_gid, groups, "/v1/snapshots")
        assert (code, doc) == (200, {"snapshots": []})


def test_an_answer_just_under_max_answer_is_the_desks(work: Path, implementation: str) -> None:
    """An answer of up to MAX_ANSWER bytes is the desk's, however its buffer grew: a body
    of 65,376 to 65,536 bytes (the caller's groups make it one) is not handed to the loop."""
    nobody = pwd.getpwnam("nobody")
    root = work / "d"
    root.mkdir(mode=0o711)
    root.chmod(0o711)
    with Hostd(root, socket_mode="0666", env=env_of(implementation)) as d:
        code, _, doc = status_as(d.socket, nobody.pw_uid, nobody.pw_gid, [])
        assert code == 200
        # each group adds 8 bytes ("1xxxxx, "): a body of MAX_ANSWER - 64 or so
        bare = len(json.dumps(doc).encode())
        n = (desk.MAX_ANSWER - 64 - bare) // 8
        code, by, doc = status_as(
            d.socket, nobody.pw_uid, nobody.pw_gid, list(range(10**5, 10**5 + n))
        )
        size = len(json.dumps(doc).encode())
        assert (code, by) == (200, True), (size, doc.get("error"))
        assert desk.MAX_ANSWER - 160 < size <= desk.MAX_ANSWER


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_the_desk_waits_then_accepts_again(
    work: Path, implementation: str
) -> None:
    """With its descriptors used up, the desk neither spins on the listener nor stops: the
    connections wait in the backlog, and are answered once descriptors are free again."""
    with Hostd(work / "d", wrap=["prlimit", "--nofile=64:64"], env=env_of(implementation)) as d:
        assert d.proc is not None
        held: list[socket.socket] = []
        try:
            deadline = time.monotonic() + 20
            while "accepting on the socket failed" not in d.log():
                assert time.monotonic() < deadline, "the daemon never ran out of descriptors"
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(d.socket))
                held.append(s)
            assert "Too many open files" in d.log()
            before = cpu_seconds(d.proc.pid)
            time.sleep(1.0)  # a window to measure: spinning would burn the whole of it
            assert cpu_seconds(d.proc.pid) - before < 0.3
        finally:
            for s in held:
                s.close()
        # The backlog the held connections filled drains as the desk accepts and closes
        # them; until then a connect with a timeout (non-blocking) gets EAGAIN, as any
        # client of a full Unix socket's backlog does.
        deadline = time.monotonic() + 20
        while True:
            try:
                status, doc = request(d.socket, "GET", "/v1/status", timeout=20)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the backlog never drained"
                time.sleep(0.05)
        assert status == 200
        assert doc["in_flight"] == 0


# -- what a hostile or odd client does ---------------------------------------------------------


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def shared(request: pytest.FixtureRequest) -> Iterator[Hostd]:
    if request.param == "native" and (why := native_missing()):
        pytest.skip(why)
    root = short_tmp("dk")
    try:
        with Hostd(root, env=env_of(request.param)) as d:
            yield d
    finally:
        rmtree(root)


def read_all(sock: Path, data: bytes, *, pause: float = 0.0) -> tuple[bytes, str | None]:
    """Send `data`, wait `pause`, read until EOF: (what came, the error that ended it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        out, err = bytearray(), None
        try:
            s.sendall(data)
            time.sleep(pause)
            while chunk := s.recv(1 << 20):
                out += chunk
        except OSError as e:
            err = f"{type(e).__name__}: {e}"
        return bytes(out), err


def test_a_status_after_a_quiet_spell_is_fresh(shared: Hostd) -> None:
    request(shared.socket, "GET", "/v1/status")
    time.sleep(desk.STALE_AFTER * 4)  # nobody asks meanwhile; the loop is idle
    _, doc = request(shared.socket, "GET", "/v1/status")
    assert doc["status_age"] <= desk.STALE_AFTER


def test_pipelined_status_requests_are_all_answered(shared: Hostd) -> None:
    n = 300
    data = b"GET /v1/status HTTP/1.1\r\nHost: h\r\n\r\n" * (n - 1)
    data += b"GET /v1/status HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    raw, err = read_all(shared.socket, data, pause=0.5)  # writes them all, then reads
    assert err is None
    got = responses(raw)
    assert [status for status, _, _ in got] == [200] * n


def test_an_unfinished_head_does_not_keep_the_desk_busy(shared: Hostd) -> None:
    """A head not whole yet stays unread in the connection: the desk must wait for more of
    it, not look at it again and again until it hands it on."""
    assert shared.proc is not None
    held = []
    before = cpu_seconds(shared.proc.pid)
    started = time.monotonic()
    try:
        while time.monotonic() - started < 1.0:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(shared.socket))
            c.sendall(b"GET /v1/status HTTP/1.1\r\n")
            held.append(c)
            time.sleep(desk.HAND_OVER_AFTER * 0.8)  # always one or two held by the desk
        used = cpu_seconds(shared.proc.pid) - before
    finally:
        for c in held:
            c.close()
    assert used < 0.3, f"{used:.2f} CPU seconds in 1 s with {len(held)} unfinished heads"


@pytest.mark.parametrize(
    "head",
    [
        b"GET /v1/status HTTP/1.1\r\nConnection: close\r\n\r\n",  # no Host
        b"GET /v1/status HTTP/1.1\r\nHost: a\x00b\r\nConnection: close\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: h\r\nHo st: a\r\nConnection: close\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: h\r\n: x\r\nConnection: close\r\n\r\n",
        b"GET /v1/status?\x01 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nHost: h\r\nX: y\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\nhello",
    ],
)
def test_a_malformed_head_gets_the_loops_400(shared: Hostd, head: bytes) -> None:
    raw, _ = read_all(shared.socket, head)
    assert raw.split(b" ", 2)[1] == b"400", raw[:120]


def test_the_answer_does_not_depend_on_how_the_head_arrives(shared: Hostd) -> None:
    head = b"GET /v1/status HTTP/1.1\r\nConnection: close\r\n\r\n"  # no Host: 400
    whole, _ = read_all(shared.socket, head)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(shared.socket))
        s.sendall(head[:20])
        time.sleep(desk.HAND_OVER_AFTER * 4)  # past the desk's wait: the loop has it
        s.sendall(head[20:])
        split = b""
        while chunk := s.recv(65536):
            split += chunk
    assert whole.split(b" ", 2)[1] == split.split(b" ", 2)[1] == b"400"


@pytest.mark.parametrize("version", [b"HTTP/1.0", b"HTTP/1.1"])
def test_bytes_after_a_closing_head_of_max_head_bytes_end_in_a_clean_close(
    shared: Hostd, version: bytes
) -> None:
    """A head of exactly MAX_HEAD bytes is the desk's; bytes after it are seen as after any
    other head (the loop's), not left unread in a connection the desk closes (a reset)."""
    head = b"GET /v1/status " + version + b"\r\nHost: h\r\nConnection: close\r\nX-Pad: "
    head += b"a" * (desk.MAX_HEAD - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == desk.MAX_HEAD
    raw, err = read_all(shared.socket, head)
    [(status, headers, _)] = responses(raw)
    assert (status, by_desk(headers), err) == (200, True, None)
    raw, err = read_all(shared.socket, head + b"XXXX", pause=0.2)
    assert err is None  # EOF, not a reset
    assert not by_desk(responses(raw)[0][1])  # (aiohttp's answer: 400)


@pytest.mark.parametrize("version", [b"HTTP/1.0", b"HTTP/1.1"])
def test_bytes_after_a_closing_request_end_in_a_clean_close(shared: Hostd, version: bytes) -> None:
    data = b"GET /v1/status " + version + b"\r\nHost: h\r\nConnection: close\r\n\r\nXXXX"
    raw, err = read_all(shared.socket, data, pause=0.2)
    assert err is None  # EOF, not a reset
    assert responses(raw)  # (aiohttp's answer: 400, data after Connection: close)
