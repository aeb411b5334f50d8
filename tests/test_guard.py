"""Connections that ask nothing (hostd/guard.py), as an attacker would hold them: idle ones, a
head a byte at a time, many from one client. First the guard in front of a real aiohttp
server on loopback with small limits; then the real daemon: nobody filling the socket with
connections, and an idle connection to the peer port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import Hostd, free_ports, rmtree, short_tmp
from test_e2e import sample
from test_peers import key_file

from hostd import caller, daemon, desk, guard
from hostd.guard import Guard, address_of

DEADLINE = 30.0
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


@contextlib.asynccontextmanager
async def served(
    g: Guard, client: Callable[[asyncio.BaseTransport], Hashable | None] = address_of
) -> AsyncIterator[int]:
    """A real aiohttp server on loopback behind `g`; yields its port."""

    async def hello(request: web.BaseRequest) -> web.Response:
        return web.Response(text="ok")

    server = web.Server(hello)
    listening = await asyncio.get_running_loop().create_server(
        g.wrap(server, client), "127.0.0.1", 0
    )
    try:
        yield listening.sockets[0].getsockname()[1]
    finally:
        listening.close()
        await server.shutdown(1)
        await listening.wait_closed()


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
OPENED: list[asyncio.StreamWriter] = []  # every client connection a test made, closed after


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while OPENED:
        w = OPENED.pop()
        w.close()
        with contextlib.suppress(ConnectionError):
            await w.wait_closed()


async def connect(port: int) -> Conn:
    conn = await asyncio.open_connection("127.0.0.1", port)
    OPENED.append(conn[1])
    return conn


async def closed_by_server(conn: Conn) -> bool:
    """Whether the server closes the connection (an EOF or a reset) within DEADLINE."""
    try:
        return await asyncio.wait_for(conn[0].read(), DEADLINE) == b""
    except ConnectionResetError:
        return True


async def served_ok(conn: Conn) -> bool:
    conn[1].write(REQUEST)
    await conn[1].drain()
    status = await asyncio.wait_for(conn[0].readline(), DEADLINE)
    await asyncio.wait_for(conn[0].readuntil(b"ok"), DEADLINE)
    return status.startswith(b"HTTP/1.1 200")


async def test_a_client_with_the_most_connections_open_has_its_next_one_closed() -> None:
    g = Guard("t", per_client=3, total=100, head_timeout=DEADLINE)
    async with served(g) as port:
        held = [await connect(port) for _ in range(3)]  # idle: they ask nothing
        extra = await connect(port)
        assert await closed_by_server(extra)
        assert (g.refused, g.connections, dict(g.open)) == (1, 3, {"127.0.0.1": 3})
        for conn in held:  # the ones let in are served as any
            assert await served_ok(conn)
        held[0][1].close()
        await held[0][1].wait_closed()
        again = await connect(port)
        assert await served_ok(again)  # a place came free
        assert g.refused == 1


async def test_everyone_together_has_a_cap_and_the_uncapped_get_in_past_it() -> None:
    g = Guard("t", per_client=100, total=2, head_timeout=DEADLINE)
    ports: list[int] = []

    def each_its_own(transport: asyncio.BaseTransport) -> Hashable | None:
        port = transport.get_extra_info("peername")[1]
        return None if port in ports else port  # (a client in `ports`: root, say)

    async with served(g, each_its_own) as port:
        a, b = await connect(port), await connect(port)
        assert await closed_by_server(await connect(port))
        assert await served_ok(a)
        assert await served_ok(b)
        assert (g.refused, g.connections) == (1, 2)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        ports.append(sock.getsockname()[1])
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)  # uncapped: let in
        OPENED.append(writer)
        assert await served_ok((reader, writer))
        assert (g.refused, g.connections) == (1, 2)  # not counted


async def test_while_everyone_together_holds_the_most_the_largest_client_gives_up_a_place() -> None:
    """A flooder under its own cap fills the total: a peer's first connection displaces the
    flooder's oldest that asked nothing (not the one it asked on), and once everyone holds
    about as many a newcomer is refused instead, with no place changing hands."""
    g = Guard("t", per_client=100, total=4, head_timeout=DEADLINE)
    who: dict[int, str] = {}

    def named(transport: asyncio.BaseTransport) -> Hashable | None:
        return who[transport.get_extra_info("peername")[1]]

    async with served(g, named) as port:

        async def connect_as(name: str, open_then: int) -> Conn:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            who[sock.getsockname()[1]] = name
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock)
            OPENED.append(writer)
            deadline = time.monotonic() + DEADLINE
            while g.connections + g.refused + g.displaced < open_then:  # accepted, in order
                assert time.monotonic() < deadline, "the server never took the connection"
                await asyncio.sleep(0.01)
            return reader, writer

        asked = await connect_as("flood", 1)
        assert await served_ok(asked)  # kept alive: it asked, no head is awaited on it now
        silent = [await connect_as("flood", n) for n in (2, 3)]
        b = await connect_as("b", 4)
        assert g.connections == 4
        c = await connect_as("c", 5)  # the total is full: flood holds 3, c none
        assert await served_ok(c)
        assert await closed_by_server(silent[0])
        assert (g.displaced, g.refused, g.connections) == (1, 0, 4)
        assert g.open == {"flood": 2, "b": 1, "c": 1}
        again = await connect_as("b", 6)  # flood holds 2, b 1: not more than one more
        assert await closed_by_server(again)
        assert (g.displaced, g.refused, g.open) == (1, 1, {"flood": 2, "b": 1, "c": 1})
        for conn in (asked, silent[1], b, c):
            assert await served_ok(conn)


async def test_no_whole_head_within_the_deadline_is_closed_one_in_time_is_served() -> None:
    g = Guard("t", per_client=100, total=100, head_timeout=0.5)
    async with served(g) as port:
        idle = await connect(port)
        slow = await connect(port)
        prompt = await connect(port)
        split = await connect(port)
        assert await served_ok(prompt)
        split[1].write(REQUEST[:-1])  # the blank line straddles two sends
        await split[1].drain()
        split[1].write(REQUEST[-1:])
        t = time.monotonic()

        async def dribble() -> None:  # a head a byte at a time, never ending
            with contextlib.suppress(ConnectionError):
                for byte in REQUEST[:-4] + b"X-Slow: " + b"y" * 10_000:
                    slow[1].write(bytes([byte]))
                    await slow[1].drain()
                    await asyncio.sleep(0.02)

        dripping = asyncio.create_task(dribble())
        blank_first = await connect(port)  # blank lines, which HTTP allows, then a dribble
        blank_first[1].write(b"\r\n\r\n\r\nGET / HTTP/1.1\r\n")
        assert await closed_by_server(idle)
        assert await closed_by_server(slow)
        assert await closed_by_server(blank_first)
        dripping.cancel()
        assert time.monotonic() - t < 0.5 + DEADLINE / 2
        assert g.timed_out == 3
        assert await asyncio.wait_for(split[0].readline(), DEADLINE) == b"HTTP/1.1 200 OK\r\n"
        await asyncio.sleep(0.6)  # past the deadline: the served ones stay
        assert await served_ok(prompt)
        assert g.timed_out == 3
        assert g.connections == 2


def test_a_tcp_client_is_its_address() -> None:
    class Peer:  # what a transport tells of its peer, and nothing else
        def __init__(self, *peer: Any) -> None:
            self.peer = peer

        def get_extra_info(self, name: str) -> Any:
            return self.peer if name == "peername" else None

    def key(*peer: Any) -> Hashable | None:
        return address_of(Peer(*peer))  # type: ignore[arg-type]

    assert key("10.1.2.3", 5000) == "10.1.2.3"
    assert key("2001:db8:1:2:aaaa::1", 5000, 0, 0) == "2001:db8:1:2:aaaa::1"
    assert key("2001:db8:1:2:bbbb::9", 6000, 0, 0) == "2001:db8:1:2:bbbb::9"  # (same /64)
    assert key("::ffff:10.1.2.3", 5000, 0, 0) == "10.1.2.3"
    assert key("fe80::1%eth0", 5000, 0, 2) == "fe80::1"
    assert key() is None


# -- the real daemon ------------------------------------------------------------------------

NOBODY = pwd.getpwnam("nobody")

# Each connection asks once (a 404: any request the loop answers) and is then kept alive idle:
# the guard's head deadline is behind it, aiohttp's keep-alive (idle_timeout) far off.
ASK = """
import socket
def ask(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(30)
    s.sendall(b"GET /nope HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    try:
        got = s.recv(65536)
    except ConnectionResetError:
        got = b""
    return s, ("served" if got.startswith(b"HTTP/1.1 404") else "closed" if not got else "?")
"""

HOLD = (
    ASK
    + """
import sys
socks = [ask(sys.argv[1]) for _ in range(int(sys.argv[2]))]
print(",".join(sorted({how for _, how in socks})), flush=True)
sys.stdin.readline()
print(ask(sys.argv[1])[1], flush=True)
"""
)


@pytest.fixture
def work() -> Iterator[Path]:
    if os.geteuid() != 0:
        why = "needs root: runs the daemon as root and the client as nobody"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    path = short_tmp("gd")
    path.chmod(0o711)
    yield path
    rmtree(path)


def connections(h: Hostd, listener: str) -> tuple[float, float, float]:
    """(open, closed as too many, closed with no head) from the daemon's metrics."""
    text = h.metrics()
    return (
        sample(text, "hostd_connections_open", listener=listener),
        sample(text, "hostd_connections_closed_total", listener=listener, reason="too_many"),
        sample(text, "hostd_connections_closed_total", listener=listener, reason="no_head"),
    )


def wait_for(what: Callable[[], bool], why: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def test_nobody_cannot_fill_the_socket_with_connections_and_root_still_gets_in(
    work: Path,
) -> None:
    cap = daemon.LOCAL_CONNECTIONS_PER_UID
    root = work / "d"
    root.mkdir(mode=0o711)
    with Hostd(root, socket_mode="0666") as h:
        holder = subprocess.Popen(
            [
                "setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}",
                "--clear-groups", sys.executable, "-c", HOLD, str(h.socket), str(cap),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )  # fmt: skip
        try:
            assert holder.stdout is not None
            assert holder.stdin is not None
            assert holder.stdout.readline() == "served\n"  # every one of them
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline() == "closed\n"  # nobody's one too many
            assert connections(h, "socket")[1] == 1
            code, _status = h.api("GET", "/v1/status")  # root is not capped
            assert code == 200
        finally:
            holder.kill()
            holder.communicate()  # (and its pipes closed)
        wait_for(lambda: connections(h, "socket")[0] <= 1, "nobody's connections stayed")


# A rootless container's process, as a runtime makes one: a user namespace of its own, its
# root mapped to a subordinate uid, then setuid(0) there (uid 200000 outside).
CONNECT = (
    ASK
    + """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER
    raise OSError(ctypes.get_errno(), "unshare")
print("unshared", flush=True)
sys.stdin.readline()  # its uid map is written meanwhile
os.setuid(0)
print(os.getuid(), flush=True)
print(ask(sys.argv[1])[1], flush=True)
"""
)


# The Python a process in a new user namespace runs (only the standard library): one that
# nobody reaches from there (a venv's may link into a home directory it cannot pass).
PLAIN_PYTHON = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin") or sys.executable


def in_own_namespace(pid: int) -> None:
    """Wait until `pid` has left our user namespace (unshare has run): its map is then its
    namespace's to be written."""
    ours = os.stat("/proc/self/ns/user").st_ino
    wait_for(lambda: os.stat(f"/proc/{pid}/ns/user").st_ino != ours, "unshare never ran")


def as_nobody(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}",
            "--clear-groups", *argv,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )  # fmt: skip


def test_the_uids_of_a_rootless_container_count_as_the_user_who_made_it(work: Path) -> None:
    """nobody holds its most connections; a process in a user namespace nobody made, its root
    mapped to uid 200000 (a subordinate uid, as newuidmap maps them), is refused too."""
    cap = daemon.LOCAL_CONNECTIONS_PER_UID
    root = work / "d"
    root.mkdir(mode=0o711)
    with Hostd(root, socket_mode="0666") as h:
        holder = as_nobody(sys.executable, "-c", HOLD, str(h.socket), str(cap))
        inner = as_nobody(PLAIN_PYTHON, "-c", CONNECT, str(h.socket))
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "served\n"
            assert inner.stdout is not None
            assert inner.stdout.readline() == "unshared\n"
            Path(f"/proc/{inner.pid}/uid_map").write_text("0 200000 1\n")
            out, _ = inner.communicate("\n", timeout=DEADLINE + 10)
            assert out == "0\nclosed\n"  # root in its namespace; one too many of nobody's
            assert connections(h, "socket")[1] == 1
        finally:
            for p in (holder, inner):
                p.kill()
                p.communicate()


def test_quota_uid_follows_the_namespace_to_the_user_who_made_it() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: writes a user namespace's uid map")
    me = os.getpid()
    assert caller.quota_uid(me, 1234, 0) == 1234  # our own namespace
    assert caller.quota_uid(2**22 + 7, 1234, 0) == caller.GONE  # exited: the shared caps
    assert caller.quota_uid(0, 1234, 0) == 1234  # (pid 0: not in our pid namespace)
    made = {"nobody": as_nobody("unshare", "--user", "cat"), "root": None}
    made["root"] = subprocess.Popen(
        ["unshare", "--user", "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        for who, p in made.items():
            assert p is not None
            in_own_namespace(p.pid)
            Path(f"/proc/{p.pid}/uid_map").write_text("0 200000 1\n")
            want = NOBODY.pw_uid if who == "nobody" else 200000
            assert caller.quota_uid(p.pid, 200000, 0) == want, who
            # the daemon's own user made it: its uids stay apart as well
            assert caller.quota_uid(p.pid, 200000, NOBODY.pw_uid) == 200000, who
    finally:
        for p in made.values():
            assert p is not None
            p.kill()
            p.communicate()


def read_answer(sock: socket.socket) -> bytes:
    """One HTTP answer's status line, the rest of it read and dropped (by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        assert got, f"closed after {data!r}"
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head.split(b"\r\n")[0]


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_a_flood_of_connections_to_the_peer_port_does_not_lock_a_peer_out(work: Path) -> None:
    """One address (127.0.0.2) fills the peer port's total with connections that ask
    nothing; a peer at another address (127.0.0.3) still gets in and is answered, the
    flooder giving up one of its places."""
    [port] = free_ports(1)
    key = key_file(work / "k")
    files = 1024  # the peer port's total: a quarter of the descriptors the daemon may have
    total = daemon.PEER_CONNECTIONS if files >= 4 * daemon.PEER_CONNECTIONS else files // 4
    peers = {"listen": f"127.0.0.1:{port}", "secret_file": str(key)}
    with Hostd(work / "h", peers=peers, wrap=["prlimit", f"--nofile={files}:{files}"]) as h:
        flood: list[socket.socket] = []
        try:
            for _ in range(total):
                flood.append(
                    socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
                )
                if len(flood) % 64 == 0 or len(flood) == total:  # (within the listen backlog)
                    wait_for(
                        lambda: connections(h, "peer")[0] == len(flood), "the flood was not let in"
                    )
            with socket.create_connection(
                ("127.0.0.1", port), source_address=("127.0.0.3", 0)
            ) as peer:
                peer.settimeout(DEADLINE)
                peer.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_answer(peer).startswith(b"HTTP/1.1 401")  # served: unproven
            metric = ("hostd_connections_closed_total", "peer", "displaced")
            assert sample(h.metrics(), metric[0], listener=metric[1], reason=metric[2]) == 1
            assert connections(h, "peer")[1] == 0  # nobody refused
            assert sum(closed_now(s) for s in flood) == 1
        finally:
            for s in flood:
                s.close()


def closed_now(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` already (without waiting for more)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_a_real_daemon_closes_what_asks_nothing_and_keeps_what_it_answered(work: Path) -> None:
    """An idle connection to the peer port is closed at the head deadline; a socket
    connection whose first request the desk answered is not (its next request is no first
    one: idle_timeout is its bound); an unproven peer request is answered 401 and closed."""
    [port] = free_ports(1)
    key = key_file(work / "k")
    with Hostd(work / "h", peers={"listen": f"127.0.0.1:{port}", "secret_file": str(key)}) as h:
        kept = socket.socket(socket.AF_UNIX)
        kept.settimeout(DEADLINE)
        kept.connect(str(h.socket))
        kept.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(kept) == b"HTTP/1.1 200 OK"
        # the desk hands it to the loop once no next request came within HAND_OVER_AFTER:
        # any deadline of its would run out before the idle one's, opened after that
        time.sleep(4 * desk.HAND_OVER_AFTER)
        idle = socket.create_connection(("127.0.0.1", port))
        idle.settimeout(DEADLINE + guard.HEAD_TIMEOUT)
        t = time.monotonic()
        assert closed(idle)
        assert time.monotonic() - t < guard.HEAD_TIMEOUT + DEADLINE / 2
        assert connections(h, "peer")[2] == 1
        kept.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")  # past the head deadline
        assert read_answer(kept).startswith(b"HTTP/1.1 404")
        assert connections(h, "socket")[2] == 0
        with socket.create_connection(("127.0.0.1", port)) as unproven:
            unproven.settimeout(DEADLINE)
            unproven.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(unproven).startswith(b"HTTP/1.1 401")
            assert closed(unproven)  # not kept alive for the next one
        idle.close()
        kept.close()
