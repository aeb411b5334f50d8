"""Peers: placement, proof of the secret, member states, the sendfile path, and real daemons
sharing chunks over loopback TCP, with peers that lie, stall, vanish or hold another secret.

The fleet-shaped faults (a peer killed mid-transfer, a partition, an origin blocked for all
but one host) run on a namespace cluster in tests/test_peers_cluster.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from harness import Hostd, free_ports, rmtree, short_tmp, tree_digest
from prometheus_client.parser import text_string_to_metric_families
from test_e2e import promtool_check, sample, wait_for
from test_small_files import small_tree

from hostd.api_peer import MAX_BODY, UNPROVEN_BODIES, UNPROVEN_PER_ADDRESS
from hostd.core import manifest as mf
from hostd.core import peerauth, rendezvous
from hostd.core.ids import chunk_id
from hostd.core.members import BACKOFF_MAX, SELF_REPROBE, STRIKE_BASE, Roster, State
from hostd.fileio import send_range
from hostd.peers import (
    PULL_MISS_BYTES,
    PULL_WASTE_BURST,
    ChunkBuffer,
    Membership,
    PeerClient,
    PeerFailure,
    PeerSource,
    PullGate,
    Uploads,
    _is_local,
    is_local_ip,
)

# --- placement ------------------------------------------------------------------------------


def ids(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


def test_each_member_owns_about_its_share() -> None:
    members = [f"10.0.0.{i}:7460" for i in range(8)]
    owned = {m: 0 for m in members}
    for cid in ids(8000):
        owner = rendezvous.owner(cid, members)
        assert owner == rendezvous.rank(cid, members)[0]
        assert owner is not None
        owned[owner] += 1
    assert all(800 <= n <= 1200 for n in owned.values()), owned


def test_a_member_leaving_moves_only_the_chunks_it_owned() -> None:
    members = [f"10.0.0.{i}:7460" for i in range(10)]
    gone = members[3]
    rest = [m for m in members if m != gone]
    for cid in ids(3000):
        before = rendezvous.owner(cid, members)
        after = rendezvous.owner(cid, rest)
        if before != gone:
            assert after == before
        else:
            assert after == rendezvous.rank(cid, members)[1]


def test_placement_does_not_depend_on_list_order() -> None:
    members = [f"h{i}:1" for i in range(6)]
    for cid in ids(200):
        assert rendezvous.owner(cid, members) == rendezvous.owner(cid, reversed(members))
    assert rendezvous.owner(b"\0" * 32, []) is None


# --- proof of the secret ------------------------------------------------------------------

SECRET = b"0123456789abcdef0123456789abcdef"


def test_a_signed_request_verifies_and_names_its_sender() -> None:
    h = peerauth.sign(SECRET, "GET", "/v1/chunks/ab?size=1", 1000, "n1")
    assert peerauth.verify(SECRET, h, "GET", "/v1/chunks/ab?size=1", 1010.0) == "n1"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"secret": b"another secret, just as long...."}, "same secret"),
        ({"target": "/v1/chunks/ab?size=2"}, "same secret"),
        ({"method": "POST"}, "same secret"),
        ({"body": b"x"}, "same secret"),
        ({"now": 1000.0 + 61}, "clock"),
        ({"now": 1000.0 - 61}, "clock"),
        ({"header": "hostd-hmac t=1000,node=n1,sig=" + "0" * 64}, "same secret"),
        ({"header": "Bearer x"}, "is not"),
        ({"header": None}, "is not"),  # the real header with a newline after it
        ({"name": "10.0.0.9:7460"}, "same secret"),  # another X-Hostd-Name than was signed
    ],
)
def test_a_request_without_the_right_proof_is_refused(change: dict[str, Any], why: str) -> None:
    good = peerauth.sign(SECRET, "GET", "/v1/chunks/ab?size=1", 1000, "n1")
    args: dict[str, Any] = {
        "secret": SECRET,
        "header": good,
        "method": "GET",
        "target": "/v1/chunks/ab?size=1",
        "now": 1000.0,
        "body": b"",
        "name": "",
    }
    args.update(change)
    if args["header"] is None:
        args["header"] = good + "\n"
    with pytest.raises(peerauth.AuthError, match=why):
        peerauth.verify(
            args["secret"],
            args["header"],
            args["method"],
            args["target"],
            args["now"],
            args["body"],
            name=args["name"],
        )


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(peerauth.AuthError, match="16"):
        peerauth.load_secret(b"  short \n", "key")
    assert peerauth.load_secret(SECRET + b"\n", "key") == SECRET


# --- member states --------------------------------------------------------------------------


def test_dead_members_back_off_and_come_back_at_the_first_answer() -> None:
    r = Roster()
    r.update({"a:1": "static", "b:1": "static"}, 0.0)
    assert {m.name for m in r.due(0.0)} == {"a:1", "b:1"}  # never probed yet
    r.answered("b:1", 0.0)
    gaps = []
    for _ in range(9):
        r.failed("a:1", 0.0, "refused")
        gaps.append(r.members["a:1"].retry_at)
    assert gaps[:4] == [1.0, 2.0, 4.0, 8.0]
    assert gaps[-1] == BACKOFF_MAX
    assert r.members["a:1"].state is State.DEAD
    assert [m.name for m in r.usable(1.0)] == ["b:1"]
    assert [m.name for m in r.due(BACKOFF_MAX)] == ["a:1"]
    r.answered("a:1", 61.0)
    assert sorted(m.name for m in r.usable(61.0)) == ["a:1", "b:1"]


def test_a_strike_skips_a_member_for_a_while_and_repeats_cost_more() -> None:
    r = Roster()
    r.update({"a:1": "static"}, 0.0)
    r.strike("a:1", 0.0, "bad bytes")
    r.strike("a:1", 0.5, "stalled")  # another request in flight when it went bad: same strike
    assert r.members["a:1"].strikes == 1
    assert r.members["a:1"].struck_until == STRIKE_BASE
    assert r.due(1.0) == []  # not probed again while struck
    assert r.usable(STRIKE_BASE - 1) == []
    assert [m.name for m in r.usable(STRIKE_BASE)] == ["a:1"]
    r.strike("a:1", 100.0, "bad bytes")
    assert r.members["a:1"].struck_until == 100.0 + 2 * STRIKE_BASE
    r.strike("a:1", 100.0 + 2000, "stall")  # long after: forgiven, back to the first length
    assert r.members["a:1"].struck_until == 2100.0 + STRIKE_BASE


def test_silent_pull_throughs_strike_when_in_a_row_and_an_answer_between_forgives() -> None:
    r = Roster()
    r.update({"a:1": "static"}, 0.0)
    assert not r.silent_pull("a:1", 0.0, "sent nothing")  # once: a slow origin's, maybe
    r.answered("a:1", 1.0, served=True)  # it served a chunk: the count starts again
    assert not r.silent_pull("a:1", 2.0, "sent nothing")
    r.answered("a:1", 2.5, "node")  # a probe's answer (or a "missing") forgives nothing
    assert r.silent_pull("a:1", 3.0, "sent nothing")  # twice in a row: struck
    assert r.members["a:1"].state.value == "struck"
    assert not r.silent_pull("a:1", 3.5, "sent nothing")  # in flight when it went bad
    assert r.members["a:1"].strikes == 1


def test_self_is_placed_but_never_asked() -> None:
    r = Roster()
    r.update({"a:1": "static", "me:1": "static"}, 0.0)
    r.mark_self("me:1", 0.0)
    assert [m.name for m in r.usable(0.0)] == ["a:1"]
    assert sorted(r.placement(0.0)) == ["a:1", "me:1"]
    r.failed("me:1", 0.0, "x")  # a failure never turns self into a peer
    assert r.members["me:1"].state is State.SELF
    assert r.due(0.0) == [r.members["a:1"]]


def test_the_buffer_keeps_the_most_recent_chunks_within_its_bytes() -> None:
    b = ChunkBuffer(10)
    for i in range(5):
        b.put(bytes([i]) * 32, b"abcd")
    assert b.used == 8
    assert b.peek(bytes([0]) * 32) is None
    assert b.peek(bytes([4]) * 32) == b"abcd"
    b.put(b"z" * 32, b"x" * 11)  # larger than the whole buffer: not kept
    assert b.peek(b"z" * 32) is None


def test_chunks_pulled_for_others_never_push_out_the_ones_this_host_owns() -> None:
    """An asker cycling through more distinct chunks than the buffer holds, none of them
    ours: the chunks we own stay, and the asker's repeats of its latest are still held."""
    b = ChunkBuffer(20)
    owned = [bytes([i]) * 32 for i in range(3)]
    for cid in owned:
        b.put(cid, b"oooo")
    for i in range(100, 200):
        b.put(bytes([i]) * 32, b"xx", owned=False)
    assert all(b.peek(cid) == b"oooo" for cid in owned)
    assert b.peek(bytes([199]) * 32) == b"xx"  # the latest others' chunks, in their share
    assert b.peek(bytes([190]) * 32) is None
    assert b.used == 3 * 4 + 2 * 2
    # An owned chunk takes the room others' chunks held, and one of ours held as another's
    # (the membership changed) moves to our share.
    b.put(bytes([198]) * 32, b"xx")
    b.put(b"n" * 32, b"nnnn")
    assert b.peek(b"n" * 32) == b"nnnn"
    assert b.peek(bytes([198]) * 32) == b"xx"
    assert all(b.peek(cid) == b"oooo" for cid in owned)
    assert b.peek(bytes([199]) * 32) == b"xx"
    assert b.used == b.capacity
    # Full: the next owned chunk pushes out others' first.
    b.put(b"m" * 32, b"mm")
    assert b.peek(bytes([199]) * 32) is None
    assert b.peek(b"m" * 32) == b"mm"
    assert all(b.peek(cid) == b"oooo" for cid in owned)
    assert b.used == b.capacity


# --- sendfile to a socket ---------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_send_range_sends_exactly_the_range(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    data = os.urandom(8 * 2**20 + 3)
    (tmp_path / "f").write_bytes(data)
    out = bytearray()

    def read() -> None:
        while len(out) < 5 * 2**20:
            got = pair[1].recv(1 << 20)
            if not got:
                return
            out.extend(got)

    reader = threading.Thread(target=read)
    reader.start()
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        send_range(pair[0].fileno(), fd, 2**20 + 1, 5 * 2**20, 5.0, threading.Event())
    finally:
        os.close(fd)
    reader.join(10)
    assert bytes(out) == data[2**20 + 1 : 6 * 2**20 + 1]


def test_send_range_gives_up_on_a_receiver_that_reads_nothing(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    (tmp_path / "f").write_bytes(os.urandom(16 * 2**20))
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="took nothing"):
            send_range(pair[0].fileno(), fd, 0, 16 * 2**20, 0.5, threading.Event())
        stop = threading.Event()
        stop.set()
        with pytest.raises(InterruptedError):
            send_range(pair[0].fileno(), fd, 0, 16 * 2**20, 30.0, stop)
    finally:
        os.close(fd)
    assert time.monotonic() - started < 10


def test_send_range_says_when_the_file_is_short(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        with pytest.raises(EOFError, match="short"):
            send_range(pair[0].fileno(), fd, 50, 100, 1.0, threading.Event())
    finally:
        os.close(fd)


# --- real daemons on loopback -------------------------------------------------------------


@pytest.fixture
def work() -> Iterator[Path]:
    root = short_tmp("pe")
    try:
        yield root
    finally:
        rmtree(root)


def key_file(path: Path, secret: bytes | None = None) -> Path:
    path.write_bytes((secret or os.urandom(24)).hex().encode() + b"\n")
    path.chmod(0o600)
    return path


class Fleet:
    """Daemons sharing one origin, each listing every peer address (itself included)."""

    def __init__(
        self,
        work: Path,
        n: int,
        extra: list[str] | None = None,
        secret: bool = True,
        extra_first: bool = False,
        config: dict[str, Any] | None = None,
        **peers: Any,
    ):
        self.work = work
        self.origin = f"file://{work}/origin"
        self.ports = free_ports(n)
        self.addrs = [f"127.0.0.1:{p}" for p in self.ports]
        self.key = key_file(work / "cluster.key")
        self.hosts: list[Hostd] = []
        for i, port in enumerate(self.ports):
            table = {
                "listen": f"127.0.0.1:{port}",
                "static": [*(extra or []), *self.addrs]
                if extra_first
                else self.addrs + (extra or []),
                "timeout": "2s",
                **peers,
            }
            if secret:
                table["secret_file"] = str(self.key)
            self.hosts.append(self.host(f"h{i}", table, **(config or {})))

    def host(self, name: str, peers: dict[str, Any] | None, **config: Any) -> Hostd:
        kw: dict[str, Any] = {"origin": self.origin, "access": {"link_to_writers": True}}
        if peers is not None:
            kw["peers"] = peers
        return Hostd(self.work / name, **kw, **config)

    def __enter__(self) -> Fleet:
        try:
            self._start()
        except BaseException:
            self.__exit__()  # a host that started must not outlive a failed start
            raise
        return self

    def _start(self) -> None:
        with ThreadPoolExecutor(len(self.hosts)) as ex:
            list(ex.map(lambda h: h.start(), self.hosts))
        # Hosts started together may probe each other before all are listening; each one's
        # first probe of the others then marks it live on them again.
        for h in self.hosts:
            wait_for(
                lambda h=h: all(  # type: ignore[misc]
                    member(h, a).get("state") in ("live", "self") for a in self.addrs
                ),
                f"{h.root.name} to see every host live",
            )

    def __exit__(self, *exc: object) -> None:
        for h in self.hosts:
            h.close()

    def publish(self, tree: Path, ref: str = "m/w", **config: Any) -> dict[str, Any]:
        """Publish from a daemon outside the fleet: no fleet host holds anything yet."""
        with self.host("pub", None, **config) as pub:
            return pub.publish(tree, ref)

    def restore_all(self, hosts: list[Hostd], ref: str = "m/w") -> list[dict[str, Any]]:
        with ThreadPoolExecutor(len(hosts)) as ex:
            return list(ex.map(lambda h: h.restore(ref, self.work / f"t-{h.root.name}"), hosts))


def origin_chunk_bytes(h: Hostd) -> float:
    return sample(h.metrics(), "hostd_origin_bytes_total", direction="in")


def big_tree(root: Path, seed: int = 3) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"shard-{i}.bin").write_bytes(rng.randbytes(9 * 2**20 + i))
    (root / "tokenizer.json").write_text(json.dumps(list(range(3000))))
    return root


def status_peers(h: Hostd) -> dict[str, Any]:
    code, st = h.api("GET", "/v1/status")
    assert code == 200
    peers: dict[str, Any] = st["peers"]
    return peers


def member(h: Hostd, address: str) -> dict[str, Any]:
    """A member's entry in `h`'s status ({} until the host has listed it)."""
    got: dict[str, Any] = next(
        (m for m in status_peers(h)["members"] if m["address"] == address), {}
    )
    return got


def probed(h: Hostd, impostor: str) -> bool:
    """Whether `h` has probed a member that answers with `h`'s own node id: `h` either took
    it for itself, or logged that it did not (and its status shows the member live)."""
    state = member(h, impostor).get("state")
    return state == "self" or (state == "live" and "never reached" in h.log())


def test_hosts_scaling_up_together_pull_each_chunk_from_the_origin_once(work: Path) -> None:
    src = big_tree(work / "src")
    with Fleet(work, 4) as fleet:
        pub = fleet.publish(src)
        outs = fleet.restore_all(fleet.hosts)
        for h, out in zip(fleet.hosts, outs, strict=True):
            assert out["event"] == "result", out
            assert tree_digest(work / f"t-{h.root.name}") == tree_digest(src)
        me = [status_peers(h) for h in fleet.hosts]
        assert sorted(p["self"] for p in me) == sorted(fleet.addrs)
        assert all(
            m["state"] == "live" for p in me for m in p["members"] if m["address"] != p["self"]
        )
        chunk_bytes = sum(origin_chunk_bytes(h) for h in fleet.hosts)
        # each chunk once, by its owner (manifests and refs are small, and read by each host)
        assert chunk_bytes <= pub["stored_bytes"] * 1.05 + 4 * 64 * 1024, (
            chunk_bytes,
            pub["stored_bytes"],
        )
        from_peers = sum(o["bytes_by_source"].get("peer", 0) for o in outs)
        assert from_peers >= 2 * pub["bytes"]  # most of the fleet's bytes came from peers
        texts = [h.metrics() for h in fleet.hosts]
        promtool_check(texts[0])  # the peer metrics pass Prometheus's own linter
        saved = sum(sample(t, "hostd_origin_saved_bytes_total") for t in texts)
        assert saved == from_peers
        served = sum(
            sample(t, "hostd_peer_served_bytes_total", source=s)
            for t in texts
            for s in ("file", "buffer", "pull")
        )
        # what was served is what was got, but for the losers of hedged races
        hedged = sum(sample(t, "hostd_peer_hedges_total", result="started") for t in texts)
        assert from_peers <= served <= from_peers + hedged * 4 * 2**20


def test_a_fleet_pulls_each_small_file_once_by_its_owner_from_its_pack(work: Path) -> None:
    # Small files lie in packs: an owner pulling one through for the fleet reads only that
    # chunk's bytes of the pack (its neighbours have other owners), so the fleet still
    # pulls each chunk from the origin once.
    src = small_tree(work / "src", n=200)
    with Fleet(work, 3) as fleet:
        pub = fleet.publish(src)
        assert pub["packs"] >= 1, pub
        outs = fleet.restore_all(fleet.hosts)
        for h, out in zip(fleet.hosts, outs, strict=True):
            assert out["event"] == "result", out
            assert tree_digest(work / f"t-{h.root.name}") == tree_digest(src)
        chunk_bytes = sum(origin_chunk_bytes(h) for h in fleet.hosts)
        # manifests and refs are small, and read by each host
        assert chunk_bytes <= pub["stored_bytes"] * 1.02 + 3 * 64 * 1024, (
            chunk_bytes,
            pub["stored_bytes"],
        )
        assert sum(o["bytes_by_source"].get("peer", 0) for o in outs) >= pub["bytes"]


def test_a_restore_from_a_fleet_that_holds_the_snapshot_reads_nothing_from_the_origin(
    work: Path,
) -> None:
    src = big_tree(work / "src")
    with Fleet(work, 3) as fleet:
        fleet.publish(src)
        first = fleet.hosts[0].restore("m/w", work / "t0")
        assert first["event"] == "result"
        before = origin_chunk_bytes(fleet.hosts[1])
        served_before = served_by_source(fleet.hosts[0], fleet.hosts[2])
        out = fleet.hosts[1].restore("m/w", work / "t1")
        got = out["bytes_by_source"]
        # from peers, or from this host's buffer of chunks it pulled as owner for the first
        assert got["peer"] + got.get("buffer", 0) == out["bytes"], got
        assert got["origin"] == 0
        assert tree_digest(work / "t1") == tree_digest(src)
        # only the manifest and ref came from the origin
        assert origin_chunk_bytes(fleet.hosts[1]) - before < 64 * 1024
        # Served by the other two from what they held: host 0's files, or a buffer of chunks
        # pulled as owner for host 0 (which host owns which chunk varies run to run, so
        # how the two split it does too); nothing was pulled through for this restore.
        served = served_by_source(fleet.hosts[0], fleet.hosts[2])
        now = {src: served[src] - served_before[src] for src in served}
        assert now["pull"] == 0, now
        assert now["file"] + now["buffer"] >= got["peer"], (now, got)


def served_by_source(*hosts: Hostd) -> dict[str, float]:
    """Bytes these hosts served to peers, by where from (file, buffer, pull)."""
    texts = [h.metrics() for h in hosts]
    return {
        src: sum(sample(t, "hostd_peer_served_bytes_total", source=src) for t in texts)
        for src in ("file", "buffer", "pull")
    }


class Member(BaseHTTPRequestHandler):
    """A misbehaving member's server, quiet: what it answers is its subclass's."""

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def size_asked(self) -> int:
        return int(self.path.split("size=")[1].split("&")[0])

    def log_message(self, format: str, *args: Any) -> None:
        pass


class WrongBytes(Member):
    """A peer that answers every chunk with the size asked for, of wrong bytes, and its
    health like a peer would."""

    def do_GET(self) -> None:
        if self.path.startswith("/v1/chunks/"):
            self.answer(200, b"\xee" * self.size_asked())
        else:
            self.answer(200, json.dumps({"node": "liar"}).encode())


class DeepHealth(Member):
    """A member whose health answer nests past the JSON parser's recursion limit (10 KB),
    and which holds no chunk."""

    def do_GET(self) -> None:
        if self.path.startswith("/v1/chunks/"):
            self.answer(404, b'{"message": "no such chunk"}')
        else:
            self.answer(200, b"[" * 5000 + b"]" * 5000)


class Trickle(Member):
    """A member that answers a chunk at once, with its size, then sends a byte every 0.3 s:
    under any per-read timeout, for ever."""

    def do_GET(self) -> None:
        if not self.path.startswith("/v1/chunks/"):
            self.answer(200, json.dumps({"node": "trickle"}).encode())
            return
        self.send_response(200)
        self.send_header("Content-Length", str(self.size_asked()))
        self.end_headers()
        try:
            for _ in range(200):  # (a minute at most: the test's own end)
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass  # cut off: as it should be


class SilentPull(Member):
    """A member that takes every pull-through (200, its size, "pull") and then sends nothing;
    that holds nothing otherwise (pull=0: 404)."""

    def do_GET(self) -> None:
        if not self.path.startswith("/v1/chunks/"):
            self.answer(200, json.dumps({"node": "silent"}).encode())
        elif "pull=1" not in self.path:
            self.answer(404, b'{"message": "no such chunk"}')
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(self.size_asked()))
            self.send_header("X-Hostd-Source", "pull")
            self.end_headers()
            self.wfile.flush()
            with contextlib.suppress(OSError):
                self.rfile.read(1)  # until the asker gives up and closes


class HangsUp(Member):
    """A member that says yes to everything: it holds every chunk asked about (`have`), takes
    every chunk request, pull-through or not, with its size and "pull" (the asker's longest
    wait), and hangs up without a byte HANG_UP_AFTER later: before any deadline trips."""

    def do_POST(self) -> None:
        asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.answer(200, json.dumps({"have": asked.get("ids", [])}).encode())

    def do_GET(self) -> None:
        if not self.path.startswith("/v1/chunks/"):
            self.answer(200, json.dumps({"node": "hangs-up"}).encode())
            return
        self.send_response(200)
        self.send_header("Content-Length", str(self.size_asked()))
        self.send_header("X-Hostd-Source", "pull")
        self.end_headers()
        self.wfile.flush()
        time.sleep(HANG_UP_AFTER)  # then the handler returns: HTTP/1.0, the connection closes


HANG_UP_AFTER = 3.0  # under the pull wait of the test below (2 x 2 s), over its timeout


def wrong_bytes_peer(
    port: int, stop: threading.Event, handler: type[BaseHTTPRequestHandler] = WrongBytes
) -> threading.Thread:
    """A WrongBytes peer (or another `handler`) on loopback until `stop` is set."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()

    def stopper() -> None:
        stop.wait()
        server.shutdown()
        server.server_close()

    threading.Thread(target=stopper, daemon=True).start()
    return t


def test_a_peer_sending_bad_bytes_is_struck_and_the_restore_is_exact(work: Path) -> None:
    src = big_tree(work / "src")
    (liar_port,) = free_ports(1)
    liar = f"127.0.0.1:{liar_port}"
    stop = threading.Event()
    wrong_bytes_peer(liar_port, stop)
    try:
        with Fleet(work, 1, extra=[liar]) as fleet:
            fleet.publish(src)
            h = fleet.hosts[0]
            out = h.restore("m/w", work / "t")
            assert out["event"] == "result", out
            assert tree_digest(work / "t") == tree_digest(src)
            assert member(h, liar)["state"] == "struck"
            assert "does not match its id" in member(h, liar)["last_error"]
            text = h.metrics()
            assert sample(text, "hostd_peer_strikes_total", reason="corrupt") >= 1
            assert sample(text, "hostd_peers", state="struck") == 1
            assert out["bytes_by_source"].get("peer", 0) == 0
    finally:
        stop.set()


def test_a_members_deeply_nested_answer_is_that_members_problem_alone(work: Path) -> None:
    """Its health answer ended the daemon (RecursionError out of the prober); now it says
    nothing, and the restore goes on without it."""
    src = big_tree(work / "src")
    (port,) = free_ports(1)
    stop = threading.Event()
    wrong_bytes_peer(port, stop, DeepHealth)
    try:
        with Fleet(work, 1, extra=[f"127.0.0.1:{port}"]) as fleet:
            fleet.publish(src)
            h = fleet.hosts[0]
            out = h.restore("m/w", work / "t")
            assert out["event"] == "result", out
            assert tree_digest(work / "t") == tree_digest(src)
            assert h.proc is not None
            assert h.proc.poll() is None  # still up
            assert "RecursionError" not in h.log()
    finally:
        stop.set()


@contextlib.contextmanager
def restored_beside(
    work: Path,
    handler: type[BaseHTTPRequestHandler],
    publish: dict[str, Any] | None = None,
    **fleet: Any,
) -> Iterator[tuple[Hostd, str, float]]:
    """A one-host fleet that also lists a bad member (`handler` on loopback) restores the
    big tree (published with `publish`'s config), exactly: yields the host, the bad member's
    address and the restore's seconds."""
    src = big_tree(work / "src")
    (port,) = free_ports(1)
    bad = f"127.0.0.1:{port}"
    stop = threading.Event()
    wrong_bytes_peer(port, stop, handler)
    try:
        with Fleet(work, 1, extra=[bad], **fleet) as f:
            f.publish(src, **(publish or {}))
            h = f.hosts[0]
            started = time.monotonic()
            out = h.restore("m/w", work / "t")
            assert out["event"] == "result", out
            assert tree_digest(work / "t") == tree_digest(src)
            yield h, bad, time.monotonic() - started
    finally:
        stop.set()


def test_a_member_that_trickles_a_chunk_is_struck_by_its_rate(work: Path) -> None:
    """A byte every 0.3 s never trips a 0.5 s timeout between reads: the restore hung for
    good, holding fetch slots that other restores waited for. A chunk must come at
    MIN_RATE past the timeout, or its member is struck and the origin asked."""
    with restored_beside(work, Trickle, timeout="500ms") as (h, slow, took):
        assert took < 30
        assert member(h, slow)["state"] == "struck"
        assert "slower than" in member(h, slow)["last_error"]


def test_an_owner_whose_pull_throughs_never_send_a_byte_is_struck(work: Path) -> None:
    """An owner that takes pull-throughs (200) and then sends nothing cost each chunk it owns
    twice the pull wait (it was asked again), for ever: a slow origin, as far as the asker
    could tell. Twice in a row with nothing served between, and it is struck."""
    # (a pull wait of 2 x 2 s; the 2 s a head may take keeps a loaded machine's slow answer
    # from striking it as a stall first)
    quick = {"request_timeout": "1s"}
    with restored_beside(work, SilentPull, timeout="2s", config=quick) as (h, silent, took):
        assert took < 30
        assert member(h, silent)["state"] == "struck"
        assert "sent nothing" in member(h, silent)["last_error"]
        assert sample(h.metrics(), "hostd_peer_strikes_total", reason="silent") == 1


def test_a_member_that_takes_chunk_requests_and_hangs_up_is_struck(work: Path) -> None:
    """It hung up each request just before the pull wait: "failed", which strikes no one and
    is asked once more, so each chunk it owned cost twice the pull wait, for good; and its
    "pull" on a plain request gave it the pull wait for the chunks it claimed to hold. Now a
    plain request waits the timeout, and a request taken and hung up on without a byte counts
    as a silent one: it is struck, and the restore goes on from the origin."""
    quick = {"request_timeout": "1s"}
    with restored_beside(work, HangsUp, timeout="2s", config=quick) as (h, bad, took):
        assert member(h, bad)["state"] == "struck", member(h, bad)
        assert took < 30


def test_an_owner_whose_own_origin_pull_fails_is_not_struck(work: Path) -> None:
    """An honest owner whose origin lost the objects for a moment hangs up the pull-throughs
    it took (it cannot serve them): that is "failed", not a member hanging up on purpose,
    and strikes no one; the next restore still gets from it what it holds."""
    a, b = big_tree(work / "a", seed=3), big_tree(work / "b", seed=4)
    with Fleet(work, 2) as fleet:
        h0, h1 = fleet.hosts
        origin = work / "origin"
        fleet.publish(a, "m/a")
        before = {p for p in origin.rglob("*") if p.is_file()}
        fleet.publish(b, "m/b")
        out = h1.restore("m/a", work / "t1a")  # h1 holds a's chunks now
        assert out["event"] == "result", out
        hidden = work / "hidden"
        hidden.mkdir()
        moved = []
        for p in origin.rglob("*"):  # b's packs and chunks go for a moment
            rel = p.relative_to(origin)
            if p.is_file() and p not in before and rel.parts[0] not in ("refs", "manifests"):
                moved.append((p, hidden / rel.as_posix().replace("/", "_")))
        for p, dst in moved:
            shutil.move(p, dst)
        out = h0.restore("m/b", work / "t0b")
        assert out["event"] == "error", out
        for p, dst in moved:
            shutil.move(dst, p)
        out = h0.restore("m/a", work / "t0a")
        assert out["event"] == "result", out
        assert tree_digest(work / "t0a") == tree_digest(a)
        assert member(h0, fleet.addrs[1])["state"] == "live"
        assert out["bytes_by_source"]["peer"] > 0


def test_an_owner_that_cannot_pull_hands_its_share_to_the_member_ranked_next(
    work: Path,
) -> None:
    """A live host whose own origin fails (credentials for another bucket, say) owns a share
    of every snapshot it cannot serve: each other host read that share from the origin
    itself, so one such host in a fleet of N made the bucket send its share N-1 times. The
    member ranked next pulls it through instead, once, and the others get it from there."""
    src = big_tree(work / "src", seed=5)
    fleet = Fleet(work, 3)
    broken = fleet.hosts[2]  # its origin: a bucket that holds nothing
    conf = broken.config_path.read_text()
    broken.config_path.write_text(conf.replace(fleet.origin, f"file://{work}/elsewhere"))
    with fleet:
        fleet.publish(src, "m/x")
        outs = fleet.restore_all(fleet.hosts[:2], "m/x")  # at once: no host holds it yet
        for h, out in zip(fleet.hosts, outs, strict=False):
            assert out["event"] == "result", out
            assert tree_digest(work / f"t-{h.root.name}") == tree_digest(src)
        read = sum(out["bytes_by_source"].get("origin", 0) for out in outs)
        # each chunk from the origin once (it was 1.3x: the broken host's share twice)
        assert read <= outs[0]["bytes"] * 1.02, (read, outs)
        assert member(fleet.hosts[0], fleet.addrs[2])["state"] == "live"  # struck by no one


class EchoesNode(Member):
    """A member that answers a probe with the asker's own node id, and holds no chunk."""

    def do_GET(self) -> None:
        if self.path.startswith("/v1/chunks/"):
            self.answer(404, b'{"message": "no such chunk"}')
        else:
            self.answer(200, json.dumps({"node": self.headers.get("X-Hostd-Node")}).encode())


class SaysSelf(Member):
    """A member that answers every chunk (and, `everywhere`, its probe too) 409 "this
    request came from this host itself"."""

    everywhere = False

    def do_GET(self) -> None:
        if self.path.startswith("/v1/chunks/") or self.everywhere:
            self.answer(409, b'{"error": "self", "message": "this request came from this host"}')
        else:
            self.answer(200, json.dumps({"node": "someone"}).encode())


class SaysSelfEverywhere(SaysSelf):
    everywhere = True


def test_a_member_that_echoes_our_node_id_is_not_taken_for_this_host(work: Path) -> None:
    """A probe that came back with the asker's node id made the member "self": listed before
    the host's own address, it became the name the host placed chunks under (the fleet's
    owners then disagreed, and origin pulls rose). Only a probe that reached our own server
    makes a member self."""
    with restored_beside(work, EchoesNode, extra_first=True) as (h, liar, _):
        wait_for(
            lambda: probed(h, liar),
            "the echoing member to be probed",
        )
        assert member(h, liar)["state"] == "live"
        peers = status_peers(h)
        assert peers["self"] == peers["listen"]


def relay_to(target: str) -> type[BaseHTTPRequestHandler]:
    class Relay(Member):
        """A member on this very host that passes each request on, as it came (proof
        included), to `target`, on a connection of its own, and answers what that said."""

        def do_GET(self) -> None:
            host, port = target.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            keep = ("authorization", "x-hostd-node", "x-hostd-name")
            headers = {k: v for k, v in self.headers.items() if k.lower() in keep}
            try:
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                self.answer(resp.status, resp.read())
            finally:
                conn.close()

    return Relay


def test_a_member_on_this_host_that_relays_our_probe_is_not_taken_for_it(work: Path) -> None:
    """A relay on this host (another process, a local proxy) reaches our server from an
    address of ours, with our probe's challenge: that alone made it "self". The probe's
    own connection must be the one our server was asked on."""
    (port,) = free_ports(1)
    relay = f"127.0.0.1:{port}"
    fleet = Fleet(work, 1, extra=[relay], extra_first=True)
    server = ThreadingHTTPServer(("127.0.0.1", port), relay_to(fleet.addrs[0]))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with fleet:
            h = fleet.hosts[0]
            wait_for(lambda: probed(h, relay), "the host to probe the relay")
            assert member(h, relay)["state"] == "live"
            peers = status_peers(h)
            assert peers["self"] == peers["listen"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_host_listed_by_a_name_finds_itself_by_its_probe(work: Path) -> None:
    """A name is no address to bind: the probe that reaches the host's own server (from an
    address of this host) finds it."""
    (port,) = free_ports(1)
    me = f"localhost:{port}"
    peers = {
        "listen": f"127.0.0.1:{port}",
        "static": [me],
        "secret_file": str(key_file(work / "cluster.key")),
    }
    with Hostd(work / "h", origin=f"file://{work}/origin", peers=peers) as h:
        wait_for(lambda: status_peers(h)["self"] == me, "the host to find itself by name")
        assert member(h, me)["state"] == "self"
        assert "never reached" not in h.log()


@pytest.mark.parametrize("liar", [SaysSelf, SaysSelfEverywhere])
def test_a_member_that_answers_409_self_is_not_taken_for_this_host(
    work: Path, liar: type[SaysSelf]
) -> None:
    """A 409 "self" answer made its sender this host; anyone can send one. It asks for a
    probe now, at most every SELF_REPROBE seconds however many 409s come (one that answers
    its probe 409 too is probed no more often)."""
    tiny = {"chunk_size": "1MiB"}  # it owns some of ~30 chunks
    with restored_beside(work, liar, tiny, extra_first=True) as (h, bad, took):
        assert member(h, bad)["state"] == "live"
        peers = status_peers(h)
        assert peers["self"] == peers["listen"]
        probes = sum(
            x.value
            for family in text_string_to_metric_families(h.metrics())
            for x in family.samples
            if x.name == "hostd_peer_request_duration_seconds_count"
            and x.labels.get("kind") == "health"
        )
        assert 1 <= probes <= 2 + took / SELF_REPROBE, probes


async def test_a_self_probe_that_stalled_once_is_settled_by_a_later_one() -> None:
    """A host listed by a name finds itself only by a probe; one that timed out (a busy
    start) struck it as a stalled peer, and it was never probed again. Its requests to
    itself are answered 409 "self": each asks for a probe (SELF_REPROBE apart), and the
    next one that reaches our server makes it self."""
    now = [1000.0]
    reached: list[Membership] = []

    class OwnServer(PeerClient):  # our own server, whose first answer did not come in time
        calls = 0

        async def health(
            self, name: str, challenge: str = ""
        ) -> tuple[dict[str, Any], tuple[str, int] | None]:
            self.calls += 1
            if self.calls == 1:
                raise PeerFailure("stall", f"peer {name} sent no answer in 5 s")
            reached[0].reached(challenge, ("127.0.0.1", 40000))  # what api_peer.health does
            return {"node": self.node}, ("127.0.0.1", 40000)  # (the probe's own end)

    client = OwnServer("me", None, 5.0, 10.0)
    me = "myhost.example:7460"  # a name: no bind test, only a probe can find it
    m = Membership((me,), (), 10.0, client, clock=lambda: now[0])
    reached.append(m)
    await m.refresh()
    for due in m.roster.due(now[0]):
        await m.probe(due)
    assert m.roster.members[me].state is State.STRUCK
    now[0] += 31  # the strike runs out: live, and asked for chunks, which come back 409
    m.report(me, PeerFailure("self", f"peer {me}: this request came from this host itself"))
    for due in m.roster.due(now[0]):
        await m.probe(due)
    assert m.roster.self_name == me
    await client.close()


async def test_a_signed_request_naming_a_dead_member_asks_for_a_probe_and_revives_nothing() -> None:
    """A request with the cluster's proof made the member it names (the sender's to choose)
    live at once: anyone with the secret could bring a member that is gone back into the
    placement. It asks for a probe now instead, and only the member's own answer revives
    it."""
    now = [1000.0]

    class Flaky(PeerClient):
        up = False

        async def health(
            self, name: str, challenge: str = ""
        ) -> tuple[dict[str, Any], tuple[str, int] | None]:
            if not self.up:
                raise PeerFailure("dead", f"peer {name}: connection refused")
            return {"node": "theirs"}, ("127.0.0.1", 40000)

    client = Flaky("me", None, 5.0, 10.0)
    other = "10.0.0.2:7460"
    m = Membership((other,), (), 10.0, client, clock=lambda: now[0])
    await m.refresh()
    for _ in range(8):  # down for a while: its backoff grows to a minute
        for due in m.roster.due(now[0]):
            await m.probe(due)
        now[0] = max(now[0], m.roster.members[other].retry_at)
    member_ = m.roster.members[other]
    assert member_.state is State.DEAD
    now[0] = member_.probed_at + 1
    assert m.roster.due(now[0]) == []  # its backoff has not run out
    m.heard_from(other, "forged")
    assert member_.state is State.DEAD  # a claim, no answer
    assert m.roster.due(now[0]) == [member_]  # probed now
    client.up = True
    await m.probe(member_)
    assert m.roster.members[other].state is State.LIVE  # (read again: it changed)
    await client.close()


async def test_a_hedged_race_both_racers_win_at_once_counts_the_chunk_once() -> None:
    """An owner slow to answer is raced by a holder; where both answers come in one turn of
    the loop, the chunk was got once: `hostd_origin_saved_bytes` (the sum of these counts)
    counted both, one chunk more than the restores got from peers."""
    data = os.urandom(1000)
    chunk = mf.Chunk(id=chunk_id(data), size=len(data))
    go = asyncio.Event()
    asked: list[str] = []

    class Racing(Answering):
        async def have(self, name: str, cids: list[bytes]) -> set[bytes]:
            return set(cids)

        async def chunk(
            self, name: str, chunk: mf.Chunk, pull: bool, answered: asyncio.Event | None = None
        ) -> tuple[memoryview, str]:
            asked.append(name)
            await go.wait()  # (the owner never says it will serve: the hedge starts)
            return memoryview(data), "held"

    client = Racing("me", None, 5.0, 10.0)
    m = Membership(("10.0.0.2:7460", "10.0.0.3:7460"), (), 10.0, client)
    await m.refresh()
    for due in m.roster.due(time.monotonic()):
        await m.probe(due)
    source = PeerSource(m, client, 0.05)
    got = asyncio.create_task(source.get(chunk))
    async with asyncio.timeout(10):
        while len(asked) < 2:  # noqa: ASYNC110 - the owner, then the holder racing it
            await asyncio.sleep(0.01)
    go.set()  # both answer now
    assert bytes(await got) == data
    assert client.stats.hedges["started"] == 1
    assert sum(client.stats.chunks.values()) == 1
    assert sum(client.stats.bytes.values()) == len(data)
    assert client.stats.bytes[("owner", "held")] == len(data)  # the owner's, no hedge won
    assert client.stats.hedges["won"] == 0
    await client.close()


def test_a_peer_that_accepts_and_never_answers_is_struck_after_the_timeout(work: Path) -> None:
    src = big_tree(work / "src")
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(64)  # connections complete in the kernel; nobody ever reads them
    addr = f"127.0.0.1:{mute.getsockname()[1]}"
    try:
        with Fleet(work, 1, extra=[addr], timeout="500ms") as fleet:
            fleet.publish(src)
            h = fleet.hosts[0]
            started = time.monotonic()
            out = h.restore("m/w", work / "t")
            assert out["event"] == "result", out
            assert tree_digest(work / "t") == tree_digest(src)
            assert time.monotonic() - started < 20
            assert member(h, addr)["state"] == "struck"
            assert sample(h.metrics(), "hostd_peer_strikes_total", reason="stall") >= 1
    finally:
        mute.close()


def test_a_member_that_takes_no_connection_is_dead_not_struck(work: Path) -> None:
    """A host that is off (no answer to a SYN; here, a listener whose queue is full) timed
    out its probe's connect and was struck as a stalled peer: never probed while struck, it
    stayed out of placement (30 s to 10 min) however soon it was back. It is dead: probed
    again after its backoff."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    addr = f"127.0.0.1:{full.getsockname()[1]}"
    taken = socket.create_connection(full.getsockname())  # the one its queue holds
    try:
        with Fleet(work, 1, extra=[addr], timeout="500ms") as fleet:
            h = fleet.hosts[0]
            wait_for(lambda: member(h, addr)["state"] != "live", "the member to be probed")
            m = member(h, addr)
            assert m["state"] == "dead", m
            assert "no connection" in m["last_error"], m
    finally:
        taken.close()
        full.close()


async def test_a_request_that_times_out_is_dead_before_a_connection_and_a_stall_after() -> None:
    """The same timeout, told apart by whether a connection was made: a chunk request to a
    listener that takes connections and never answers stalls; to one that takes none (its
    queue full: SYNs dropped, as to a host switched off), the member is dead."""
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(64)
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    taken = socket.create_connection(full.getsockname())
    client = PeerClient("me", None, 0.5, 1.0)
    chunk = mf.Chunk(b"\x01" * 32, 10, mf.CODEC_RAW)
    try:
        for listener, kind in ((mute, "stall"), (full, "dead")):
            name = f"127.0.0.1:{listener.getsockname()[1]}"
            with pytest.raises(PeerFailure) as got:
                await client.chunk(name, chunk, False)
            assert got.value.kind == kind, got.value.message
            with pytest.raises(PeerFailure) as got:
                await client.health(name)
            assert got.value.kind == kind, got.value.message
    finally:
        await client.close()
        for s in (taken, full, mute):
            s.close()


def test_an_owner_that_is_down_is_marked_dead_and_others_serve(work: Path) -> None:
    src = big_tree(work / "src")
    (gone_port,) = free_ports(1)  # nothing listens there
    gone = f"127.0.0.1:{gone_port}"
    with Fleet(work, 2, extra=[gone]) as fleet:
        fleet.publish(src)
        outs = fleet.restore_all(fleet.hosts)
        for h, out in zip(fleet.hosts, outs, strict=True):
            assert out["event"] == "result", out
            assert tree_digest(work / f"t-{h.root.name}") == tree_digest(src)
            m = member(h, gone)
            assert m["state"] == "dead"
            assert "refused" in m["last_error"].lower()
            assert sample(h.metrics(), "hostd_peers", state="dead") == 1


class Answering(PeerClient):
    """A client whose every probe of a member gets its health answer (in process, no
    sockets): the members are live once probed."""

    async def health(
        self, name: str, challenge: str = ""
    ) -> tuple[dict[str, Any], tuple[str, int] | None]:
        return {"node": name}, ("127.0.0.1", 40000)


def peer_request(
    addr: str,
    path: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    import http.client

    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def test_pulls_that_do_not_verify_bar_their_asker_once_past_a_bursts_bytes(work: Path) -> None:
    """A pull-through names where the chunk lies at the origin; a request of a few hundred
    bytes that names a pack's bytes under another chunk id (here, 64 MiB past a small
    pack's end) made the owner read them (up to 256 MiB), find they are not the chunk, and
    cut the connection, and the next one the same, for ever. An honest asker meeting a
    rotten pack wastes a little; past PULL_WASTE_BURST, the address gets no pull until its
    waste drains (404, counted), while what the owner holds is still served to it."""
    src = small_tree(work / "src", n=20)
    with Fleet(work, 1, secret=False, allow_unauthenticated=True) as fleet:
        pub = fleet.publish(src)
        h = fleet.hosts[0]
        origin = work / "origin"
        m = mf.decode(next((origin / "manifests").iterdir()).read_bytes())
        packed = [c for f in m.files for c in f.chunks if c.packed is not None]
        assert packed, pub
        c = packed[0]
        p = c.packed
        assert p is not None
        where = f"pull=1&pack={p.pack.hex()}&off={p.offset}&len={p.length}&psize={p.pack_size}"
        rotten = f"/v1/chunks/{'ab' * 32}?size={c.size}&{where}"  # real bytes, not that chunk
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            peer_request(fleet.addrs[0], rotten)  # read, not verified: cut
        big = 64 << 20
        lie = f"pull=1&pack={p.pack.hex()}&off={p.offset}&len={big}&psize={1 << 36}"
        liar = f"/v1/chunks/{'cd' * 32}?size={big}&{lie}"
        cut = 0
        for _ in range(PULL_WASTE_BURST // big + 2):  # (the waste drains as time passes)
            try:
                got, body = peer_request(fleet.addrs[0], liar)
            except (ConnectionError, http.client.HTTPException):
                cut += 1  # read, not verified
                continue
            break
        assert cut >= PULL_WASTE_BURST // big  # within the burst: a rotten pack's worth
        assert got == 404, body
        assert "did not verify" in body["message"], body
        honest = f"/v1/chunks/{c.id.hex()}?size={c.size}&{where}"
        got, body = peer_request(fleet.addrs[0], honest)
        assert got == 404, body  # a pull still: barred
        assert sample(h.metrics(), "hostd_peer_refused_total", reason="barred") == 2
        out = h.restore("m/w", work / "t")  # the owner holds it now
        assert out["event"] == "result", out
        host, port = fleet.addrs[0].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", f"/v1/chunks/{c.id.hex()}?size={c.size}")
            resp = conn.getresponse()
            assert resp.status == 200  # held: served
            assert len(resp.read()) == c.size
        finally:
            conn.close()


def test_pulls_of_chunks_the_origin_does_not_hold_bar_their_asker_too(work: Path) -> None:
    """A pull of an id nobody published costs the owner a GET of the origin, whatever size
    it names, and was never counted: an address naming made-up ids made the owner ask the
    origin for each, for ever. Each counts as PULL_MISS_BYTES of waste: past a burst's worth
    the address is barred (404, counted), and the origin is not asked."""
    src = small_tree(work / "src", n=5)
    with Fleet(work, 1, secret=False, allow_unauthenticated=True) as fleet:
        fleet.publish(src)
        h = fleet.hosts[0]
        most = PULL_WASTE_BURST // PULL_MISS_BYTES
        pulled = 0
        for _ in range(2 * most):
            made_up = os.urandom(32).hex()
            try:
                got, body = peer_request(fleet.addrs[0], f"/v1/chunks/{made_up}?size=1&pull=1")
            except (ConnectionError, http.client.HTTPException):
                pulled += 1  # a pull: the origin asked, nothing found, the connection cut
                continue
            break
        assert got == 404, body
        assert "no pull is made" in body["message"], body
        assert most <= pulled < 2 * most  # (the waste drains as time passes)
        assert sample(h.metrics(), "hostd_peer_refused_total", reason="barred") == 1
        out = h.restore("m/w", work / "t")  # the host's own restores are not the asker's
        assert out["event"] == "result", out


def test_bodies_read_before_their_proof_are_bounded_in_number(work: Path) -> None:
    """A request whose proof only parses (no secret needed) had its body, up to MAX_BODY,
    read and held before the proof was checked, for up to the timeout, on as many
    connections as the guard allows (a thousand from one address: +260 MiB). Past
    UNPROVEN_PER_ADDRESS from one address (UNPROVEN_BODIES in all) the answer is 503, and
    another address is not starved by it; a GET takes no body at all."""
    with Fleet(work, 1) as fleet:
        host, port = fleet.addrs[0].rsplit(":", 1)
        forged = peerauth.sign(os.urandom(24), "POST", "/v1/have", int(time.time()), "x" * 16)
        head = (
            f"POST /v1/have HTTP/1.1\r\nHost: {host}\r\nAuthorization: {forged}\r\n"
            f"Content-Length: {MAX_BODY - 1}\r\n\r\n"
        ).encode() + b"{" * 1000  # then nothing more: the body is never whole
        held = []
        try:
            assert UNPROVEN_PER_ADDRESS < UNPROVEN_BODIES
            for _ in range(UNPROVEN_PER_ADDRESS):
                s = socket.create_connection((host, int(port)), timeout=10)
                s.sendall(head)
                held.append(s)
            deadline = time.monotonic() + 20
            while True:  # (the server reads what was sent on its own time)
                got, body = peer_request(
                    fleet.addrs[0],
                    "/v1/have",
                    {"Authorization": forged},
                    method="POST",
                    body=b"{}",
                )
                if got == 503 or time.monotonic() > deadline:
                    break
            assert got == 503, body
            assert "unproven" in body["message"], body
            other = http.client.HTTPConnection(
                host, int(port), timeout=10, source_address=("127.0.0.2", 0)
            )
            try:  # another address: past the gate, its (forged) proof refused
                other.request("POST", "/v1/have", body=b"{}", headers={"Authorization": forged})
                assert other.getresponse().status == 401
            finally:
                other.close()
        finally:
            for s in held:
                s.close()
        got, body = peer_request(
            fleet.addrs[0], "/v1/health", {"Authorization": forged}, body=b"x" * 10
        )
        assert got == 400, body
        assert "takes no body" in body["message"], body


def test_a_pull_gate_bounds_bytes_in_flight_and_wasted_per_address() -> None:
    now = [0.0]
    gate = PullGate(budget=100, clock=lambda: now[0], burst=1000, rate=10)
    assert not gate.full("a", 500)  # one at least, whatever its size
    with gate.pulling("a", 60):
        assert gate.full("a", 50)
        assert not gate.full("a", 40)
        assert not gate.full("b", 50)  # each address its own
    with gate.pulling("a", 0), gate.pulling("a", 10):  # (a held chunk's: nothing to count)
        pass
    assert not gate.full("a", 500)
    assert gate.failed("a", 600) == 0  # within the burst: a rotten pack's chunk, say
    assert gate.barred("a") == 0
    assert gate.failed("a", 600) == 20  # 1200 wasted: 200 over, drained at 10 a second
    assert gate.barred("b") == 0
    now[0] += 10
    assert gate.barred("a") == 10
    now[0] += 10
    assert gate.barred("a") == 0
    now[0] += 1000
    assert gate.failed("a", 600) == 0  # drained


def test_requests_without_the_secret_are_refused_and_hosts_with_another_are_rejecting(
    work: Path,
) -> None:
    src = big_tree(work / "src")
    with Fleet(work, 2) as fleet:
        fleet.publish(src)
        assert fleet.hosts[0].restore("m/w", work / "t0")["event"] == "result"
        a = fleet.addrs[0]
        # no proof
        code, body = peer_request(a, "/v1/health")
        assert (code, body["error"]) == (401, "unauthorized")
        assert "secret" in body["message"]
        # a proof made with another secret
        other = b"x" * 32
        path = "/v1/have"
        payload = json.dumps({"ids": ["00" * 32]}).encode()
        auth = peerauth.sign(other, "POST", path, int(time.time()), "intruder", payload)
        code, body = peer_request(a, path, {"Authorization": auth}, "POST", payload)
        assert code == 401
        assert "same secret" in body["message"]
        # a proof from the right secret but an old clock
        secret = peerauth.load_secret(fleet.key.read_bytes(), "key")
        auth = peerauth.sign(secret, "GET", "/v1/health", int(time.time()) - 600, "n")
        code, body = peer_request(a, "/v1/health", {"Authorization": auth})
        assert code == 401
        assert "clock" in body["message"]
        # a daemon with another secret: its peers reject it, and it restores from the origin
        (port,) = free_ports(1)
        odd = fleet.host(
            "odd",
            {
                "listen": f"127.0.0.1:{port}",
                "static": [*fleet.addrs, f"127.0.0.1:{port}"],
                "secret_file": str(key_file(work / "other.key")),
                "timeout": "2s",
            },
        )
        with odd:
            out = odd.restore("m/w", work / "t-odd")
            assert out["event"] == "result", out
            assert tree_digest(work / "t-odd") == tree_digest(src)
            states = wait_for(
                lambda: (
                    {m["state"] for m in status_peers(odd)["members"]} == {"self", "rejecting"}
                    and status_peers(odd)
                ),
                "the others to reject the odd host",
            )
            assert all(
                "secret" in m["last_error"] for m in states["members"] if m["state"] != "self"
            )
        assert (
            sample(fleet.hosts[0].metrics(), "hostd_peer_refused_total", reason="unauthorized") >= 3
        )


def test_peer_api_answers_bad_requests_with_a_json_error(work: Path) -> None:
    with Fleet(work, 1, secret=False, allow_unauthenticated=True) as fleet:
        a = fleet.addrs[0]
        good = "ab" * 32
        for path, code in [
            (f"/v1/chunks/{good}", 400),  # no size
            (f"/v1/chunks/{good}?size=0", 400),
            (f"/v1/chunks/{good}?size=999999999999", 400),
            (f"/v1/chunks/{good}?size=10&codec=7", 400),
            (f"/v1/chunks/{good}?size=%C2%B2", 400),  # "²": a digit to isdigit, not to int
            (f"/v1/chunks/{good}?size=10&codec=%C2%B9", 400),
            (f"/v1/chunks/{good[:-1]}?size=10", 400),
            (f"/v1/chunks/{good}%0a?size=10", 400),  # $ would match before a newline
            (f"/v1/chunks/{good.upper()}?size=10", 400),
            (f"/v1/chunks/{good}?size=10", 404),  # well formed, not held
            ("/v1/nothing", 404),
        ]:
            got, body = peer_request(a, path)
            assert got == code, (path, got, body)
            assert set(body) == {"error", "message"}, body
        got, body = peer_request(a, f"/v1/chunks/{good}?size=10", method="HEAD")
        assert got == 405
        many = json.dumps({"ids": [good] * 5000}).encode()
        got, body = peer_request(a, "/v1/have", method="POST", body=many)
        assert got in (400, 413)
        assert "error" in body
        got, body = peer_request(a, "/v1/have", method="POST", body=b'{"ids": ["zz"]}')
        assert got == 400
        assert "ids[0]" in body["message"]
        got, body = peer_request(
            a, "/v1/have", method="POST", body=json.dumps({"ids": [good]}).encode()
        )
        assert (got, body) == (200, {"have": []})
        code, st = fleet.hosts[0].api("GET", "/v1/status")
        assert st["peers"]["auth"] == "none"
        assert "WITHOUT authentication" in fleet.hosts[0].log()


def test_a_new_secret_file_takes_effect_at_a_reload(work: Path) -> None:
    """The key file rewritten (a leaked secret rotated) and the daemon reloaded: the old
    secret was still accepted, the new one refused, and nothing said so until a restart.
    Now the reload takes the new secret for the requests after it, both ways."""
    with Fleet(work, 1) as fleet:
        h, addr = fleet.hosts[0], fleet.addrs[0]
        old = peerauth.load_secret(fleet.key.read_bytes(), "key")

        def health(secret: bytes) -> int:
            auth = peerauth.sign(secret, "GET", "/v1/health", int(time.time()), "n" * 16)
            return peer_request(addr, "/v1/health", {"Authorization": auth})[0]

        assert health(old) == 200
        key_file(fleet.key)
        new = peerauth.load_secret(fleet.key.read_bytes(), "key")
        h.signal(signal.SIGHUP)
        wait_for(lambda: "cluster secret changed" in h.log(), "the new secret taken")
        assert health(old) == 401
        assert health(new) == 200
        assert status_peers(h)["auth"] == "hmac"
        # a key file made unusable is refused, and the running secret kept
        fleet.key.write_bytes(b"short\n")
        h.signal(signal.SIGHUP)
        wait_for(lambda: "keeping the running cluster secret" in h.log(), "the refusal")
        assert health(new) == 200


def test_hosts_that_refused_each_other_during_a_rotation_are_live_once_both_reloaded(
    work: Path,
) -> None:
    """A secret rotated host by host: one that took the new secret first is refused by the
    others, which count it rejecting and probe it again on a backoff that doubles up to a
    minute. Once every host has the new secret, they were still apart until that backoff
    ran out, each placing chunks without the others and reading their shares from the
    origin. A reload that takes a new secret probes the members that refused it at once."""
    fleet = Fleet(work, 2)
    keys = []
    for i, h in enumerate(fleet.hosts):  # a key file each, as on separate hosts
        keys.append(key_file(work / f"key{i}", peerauth.load_secret(fleet.key.read_bytes(), "k")))
        h.config_path.write_text(h.config_path.read_text().replace(str(fleet.key), str(keys[i])))
    with fleet:
        (h0, h1), (a0, _) = fleet.hosts, fleet.addrs
        new = os.urandom(24)
        key_file(keys[0], new)
        h0.signal(signal.SIGHUP)
        wait_for(lambda: "cluster secret changed" in h0.log(), "h0 to take the new secret")
        fleet.publish(small_tree(work / "src", n=40), "m/x")
        h1.restore("m/x", work / "t1")  # asks h0 for its share: refused
        # refused again at each probe, until the next one is a while off
        wait_for(lambda: member(h1, a0).get("retry_in", 0) > 6, "h1 to probe h0 rarely", timeout=30)
        key_file(keys[1], new)
        h1.signal(signal.SIGHUP)
        wait_for(lambda: "cluster secret changed" in h1.log(), "h1 to take the new secret")
        wait_for(lambda: member(h1, a0)["state"] == "live", "h0 live on h1", timeout=4)


@contextlib.asynccontextmanager
async def probing(m: Membership, client: PeerClient) -> AsyncIterator[None]:
    """`m`'s prober running through the block, which must end within a deadline; then
    stopped, and the client closed."""
    runner = asyncio.ensure_future(m.run())
    try:
        async with asyncio.timeout(10):
            yield
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await client.close()


async def live(m: Membership, name: str) -> None:
    while m.roster.members[name].state is not State.LIVE:  # noqa: ASYNC110 - no event for it
        await asyncio.sleep(0.01)


async def test_a_new_secret_taken_while_a_probe_round_is_out_probes_the_rejecting_members() -> None:
    """A reload that takes a new secret while the prober waits for a round to end (a listed
    host switched off: its probe waits for the timeout) marks the members that refused the
    old one for the next round. The wake it gave was cleared when that round ended, and they
    waited for their backoff (a minute, in a rotation) after all."""
    dead, refusing = "10.0.0.2:7460", "10.0.0.3:7460"
    off, probed = asyncio.Event(), asyncio.Event()

    class Rotating(PeerClient):
        async def health(
            self, name: str, challenge: str = ""
        ) -> tuple[dict[str, Any], tuple[str, int] | None]:
            if name == dead:
                probed.set()
                await off.wait()
                raise PeerFailure("dead", f"peer {name}: no connection in 5 s")
            if self.secret == b"old":
                raise PeerFailure("rejected", f"peer {name} answered 401")
            return {"node": "n3"}, ("127.0.0.1", 40000)

    client = Rotating("me", b"old", 5.0, 10.0)
    m = Membership((dead, refusing), (), 3600.0, client)
    await m.refresh()
    now = m.clock()
    for _ in range(8):  # both at the longest backoff, due now
        m.roster.failed(dead, now, "no connection")
        m.roster.rejected(refusing, now, "401")
    for n in (dead, refusing):
        m.roster.members[n].retry_at = now
    async with probing(m, client):
        await probed.wait()  # the round is out
        while m.roster.members[refusing].probed is False:  # noqa: ASYNC110 - refused
            await asyncio.sleep(0.01)
        assert m.roster.members[refusing].retry_at - m.clock() > 30
        client.secret = b"new"
        m.rekeyed()
        off.set()
        await live(m, refusing)


async def test_a_probe_refused_for_the_old_secret_after_a_reload_is_made_again() -> None:
    """A reload that takes a new secret while a probe of a member that refused the old one
    is out: its refusal (of the old secret's proof) comes back after the reload and set the
    member's backoff anew, up to a minute, and the probe the reload asked for never went."""
    name = "10.0.0.3:7460"
    out, answer = asyncio.Event(), asyncio.Event()

    class Rotating(PeerClient):
        async def health(
            self, name: str, challenge: str = ""
        ) -> tuple[dict[str, Any], tuple[str, int] | None]:
            signed = self.secret
            out.set()
            await answer.wait()
            if signed == b"old":
                raise PeerFailure("rejected", f"peer {name} answered 401")
            return {"node": "n3"}, ("127.0.0.1", 40000)

    client = Rotating("me", b"old", 5.0, 10.0)
    m = Membership((name,), (), 3600.0, client)
    await m.refresh()
    now = m.clock()
    for _ in range(8):  # at the longest backoff, due now
        m.roster.rejected(name, now, "401")
    m.roster.members[name].retry_at = now
    async with probing(m, client):
        await out.wait()
        client.secret = b"new"
        m.rekeyed()
        answer.set()
        await live(m, name)


def test_peers_stay_off_without_a_secret_and_say_so(work: Path) -> None:
    (port,) = free_ports(1)
    h = Hostd(work / "h", peers={"listen": f"127.0.0.1:{port}"})
    with h:
        _code, st = h.api("GET", "/v1/status")
        assert st["peers"] is None
        wait_for(lambda: "peers are OFF" in h.log(), "the log to say peers are off")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.parametrize(
    ("content", "mode", "why"),
    [(b"0123456789abcdef0123", 0o644, "readable by every user"), (b"short", 0o600, "16")],
)
def test_a_bad_secret_file_stops_the_daemon_with_its_key_named(
    work: Path, content: bytes, mode: int, why: str
) -> None:
    key = work / "k"
    key.write_bytes(content)
    key.chmod(mode)
    h = Hostd(work / "h", peers={"listen": "127.0.0.1:0", "secret_file": str(key)})
    proc = subprocess.run(
        [*h.wrap, sys.executable, "-m", "hostd", "serve", "--config", str(h.config_path)],
        env=h.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "peers.secret_file" in proc.stderr
    assert why in proc.stderr


def test_hosts_that_list_each_other_under_different_names_never_loop(work: Path) -> None:
    """Membership views that disagree: each host may think the other owns a chunk the other
    thinks it owns. A pull is never forwarded, so each is served from the other's origin."""
    src = big_tree(work / "src")
    p0, p1 = free_ports(2)
    key = key_file(work / "k")
    fleet_hosts = []
    for i, (port, static) in enumerate(
        [
            (p0, [f"127.0.0.1:{p0}", f"127.0.0.1:{p1}"]),
            (p1, [f"127.0.0.2:{p0}", f"127.0.0.1:{p1}"]),  # h0 under another name
        ]
    ):
        fleet_hosts.append(
            Hostd(
                work / f"h{i}",
                origin=f"file://{work}/origin",
                access={"link_to_writers": True},
                peers={
                    "listen": f"0.0.0.0:{port}",
                    "static": static,
                    "secret_file": str(key),
                    "timeout": "2s",
                },
            )
        )
    with Hostd(work / "pub", origin=f"file://{work}/origin") as pub:
        pub.publish(src, "m/w")
    try:
        for h in fleet_hosts:
            h.start()
        with ThreadPoolExecutor(2) as ex:
            outs = list(ex.map(lambda h: h.restore("m/w", work / f"t-{h.root.name}"), fleet_hosts))
        for h, out in zip(fleet_hosts, outs, strict=True):
            assert out["event"] == "result", out
            assert tree_digest(work / f"t-{h.root.name}") == tree_digest(src)
    finally:
        for h in fleet_hosts:
            h.close()


# --- the serving gate ---------------------------------------------------------------------


async def test_a_busy_host_names_the_hosts_it_served_and_never_the_asker() -> None:
    u = Uploads(2, random.Random(1))
    cid = b"c" * 32
    assert await u.admit(cid, "a:1", 0.01) is None
    with u.taken(), u.taken():
        # at the limit with nobody served yet: the asker waits a little, then hears "busy"
        started = asyncio.get_running_loop().time()
        assert await u.admit(cid, "a:1", 0.05) == []
        assert asyncio.get_running_loop().time() - started >= 0.05
        u.served(cid, "b:1")
        u.served(cid, "a:1")
        assert await u.admit(cid, "a:1", 0.05) == ["b:1"]
        assert sorted(await u.admit(cid, "z:1", 0.05) or []) == ["a:1", "b:1"]
    assert await u.admit(cid, "a:1", 0.05) is None


async def test_a_waiting_asker_is_answered_as_soon_as_a_first_copy_lands() -> None:
    u = Uploads(1, random.Random(1))
    cid = b"d" * 32
    with u.taken():
        waiting = asyncio.ensure_future(u.admit(cid, "a:1", 30.0))
        await asyncio.sleep(0)
        assert not waiting.done()
        u.served(cid, "b:1")
        assert await asyncio.wait_for(waiting, 5) == ["b:1"]


def test_placement_remembers_owners_and_ranks() -> None:
    members = [f"10.0.0.{i}:1" for i in range(12)]
    p = rendezvous.Placement(members)
    for cid in ids(100):
        assert p.owner(cid) == rendezvous.owner(cid, members)
        assert p.rank(cid) == rendezvous.rank(cid, members)
        assert p.owner(cid) == p.rank(cid)[0]


def test_an_ipv6_link_local_address_of_this_host_is_one_of_its_own() -> None:
    """fe80:: addresses mean something only with their interface ("%eth0"): dropped, the
    bind test failed, and a host listed (or reaching itself) by one never found itself."""
    with open("/proc/net/if_inet6") as f:  # address, index, prefix, scope, flags, name
        link = [row.split() for row in f if row.split()[3] == "20"]
    if not link:
        pytest.skip("no IPv6 link-local address on this host")
    ip = f"{ipaddress.IPv6Address(int(link[0][0], 16))}%{link[0][5]}"
    assert is_local_ip(ip)
    assert _is_local(f"[{ip}]:7460", 7460)
    assert not is_local_ip(ip.split("%")[0].rsplit(":", 1)[0] + ":ffff%" + link[0][5])


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Pad: " + b"x" * 200_000, "failed"),  # a head without end
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"10000\r\n"
            + b"{" * 0x10000
            + b"\r\n" * 40,
            "failed",
        ),  # a body past the cap
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "stall"),  # and then nothing
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "failed"),  # not HTTP
        (b"HTTP/1.1 2\xb20 OK\r\n\r\n", "failed"),  # a "digit" int() cannot read
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X-T: y\r\n" * 20_000,
            "failed",
        ),  # trailers without end
        (b"", "dead"),  # closed at once: nothing serves there (aiohttp's ServerDisconnected)
    ],
)
async def test_a_probe_reads_a_hostile_health_answer_within_its_caps(
    answer: bytes, kind: str
) -> None:
    """The health probe reads its answer on a connection of its own: a member's answer is
    read to the head's limit and the body's cap, within the timeout, and told as a failure
    of its kind, with nothing more buffered."""

    handlers: list[asyncio.Task[None] | None] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)  # (not drained: the prober stops reading at its cap)
            if answer:
                await reader.read()  # until the prober hangs up
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = PeerClient("n1", None, 1.0, 2.0)
    try:
        started = time.monotonic()
        with pytest.raises(PeerFailure) as info:
            await client.health(f"127.0.0.1:{port}", "c" * 32)
        assert info.value.kind == kind, info.value.message
        assert time.monotonic() - started < 5
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.wait_for(asyncio.gather(*(t for t in handlers if t)), 5)
        await client.close()


async def test_a_member_whose_probe_answers_no_http_is_dead_and_probed_with_backoff() -> None:
    """A listed port where no hostd answers (another service, a forwarder with no backend)
    stayed live and placed, its probe's answer counting for nothing; once a request had
    marked it dead, each probe left it due again at once: probed 20 times a second."""
    probes: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        probes.append(1)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        with contextlib.suppress(OSError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    name = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = PeerClient("n1", None, 1.0, 2.0)
    m = Membership((name,), (), 10.0, client)
    running = asyncio.ensure_future(m.run())
    try:
        await asyncio.sleep(2.5)
        assert m.roster.members[name].state is State.DEAD
        assert 1 <= len(probes) <= 3, len(probes)  # at 0, 1 and 3 s: a doubling backoff
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        server.close()
        await server.wait_closed()
        await client.close()


async def test_dns_names_become_members_and_this_host_finds_itself() -> None:
    client = PeerClient("n1", None, 1.0, 2.0)
    m = Membership((), ("localhost:7460", "no-such-host.invalid:7460"), 10.0, client)
    m.port = 7460
    await m.refresh()
    names = set(m.roster.members)
    assert "127.0.0.1:7460" in names
    assert m.roster.self_name in ("127.0.0.1:7460", "[::1]:7460")
    assert client.name == m.roster.self_name
    assert set(m.placement()) == names  # live until a request says otherwise, self included
    # a name that stops resolving keeps its last answer rather than emptying the fleet
    m.dns = ("no-such-host.invalid:7460", "a..b:7460")  # the second is not even a DNS name
    m._resolved["no-such-host.invalid:7460"] = {"10.9.9.9:7460"}
    await m.refresh()
    assert "10.9.9.9:7460" in m.roster.members
    await client.close()


def test_a_derived_placement_places_as_a_fresh_one() -> None:
    members = [f"10.0.0.{i}:1" for i in range(20)]
    chunks = ids(300)
    p = rendezvous.Placement(members)
    for cid in chunks:
        p.owner(cid)
    fewer = [m for m in members if m not in ("10.0.0.3:1", "10.0.0.7:1")]
    more = [*fewer, "10.0.1.1:1", "10.0.1.2:1"]
    q = p.derive(fewer).derive(more)
    for cid in chunks:
        assert q.owner(cid) == rendezvous.owner(cid, more)
    assert rendezvous.Placement([]).owner(chunks[0]) is None


def test_a_body_that_never_ends_is_cut_before_its_proof_is_checked(work: Path) -> None:
    """The proof covers the body, so the body is read first: a sender that never sends its
    last bytes held the connection and its buffered body for ever, with no secret at all
    (a well-formed, current, wrong proof). Now the connection is cut after the timeout."""
    with Fleet(work, 1, timeout="500ms") as fleet:
        h = fleet.hosts[0]
        port = fleet.ports[0]
        now = int(time.time())
        proof = peerauth.sign(b"not the secret" * 3, "POST", "/v1/have", now, "n" * 16, b"x")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                f"POST /v1/have HTTP/1.1\r\nHost: x\r\nAuthorization: {proof}\r\n"
                f"Content-Length: 300000\r\n\r\n".encode()
                + b"{" * 1000
            )
            started = time.monotonic()
            got = b""
            while piece := s.recv(4096):  # until the daemon closes it (or the 10 s timeout)
                got += piece
            assert time.monotonic() - started < 5, got
        assert h.proc is not None
        assert h.proc.poll() is None
        assert "internal error" not in h.log()  # (anyone can do it: no error in the log)


class _Canary(BaseHTTPRequestHandler):
    """Any server on the network: records every request that reaches it."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.path)
        body = b"{}"
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def busy_naming(target: str) -> type[BaseHTTPRequestHandler]:
    """A member that says it holds every chunk (`have`), and answers every chunk request
    busy, naming `target` (no member: any address, with a path of its choosing) a holder."""

    class BusyHolder(Member):
        def do_POST(self) -> None:
            asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.answer(200, json.dumps({"have": asked.get("ids", [])}).encode())

        def do_GET(self) -> None:
            if not self.path.startswith("/v1/chunks/"):
                self.answer(200, json.dumps({"node": "busy"}).encode())
                return
            doc = {"error": "busy", "message": "busy", "holders": [target]}
            self.answer(503, json.dumps(doc).encode())

    return BusyHolder


def test_a_busy_members_holders_hint_cannot_send_requests_outside_the_fleet(
    work: Path,
) -> None:
    """A busy holder's answer names the hosts it served, and the asker tries them next:
    only those that are members of the placement, as PeerSource._holders keeps them. A name
    is the answer's to choose (any host, port and path: `host:port/path?`), so a member, or
    anything answering at a listed address, must not make this host send signed GETs
    anywhere else."""
    canary_port, bad_port = free_ports(2)
    _Canary.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", canary_port), _Canary)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    target = f"127.0.0.1:{canary_port}/internal/admin?x="
    wrong_bytes_peer(bad_port, stop, busy_naming(target))
    src = big_tree(work / "src")
    try:
        with Fleet(work, 1, extra=[f"127.0.0.1:{bad_port}"], timeout="500ms") as fleet:
            fleet.publish(src)
            h = fleet.hosts[0]
            out = h.restore("m/w", work / "t")
            assert out["event"] == "result", out
            assert tree_digest(work / "t") == tree_digest(src)
            assert _Canary.seen == [], _Canary.seen[:3]
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


async def test_a_member_busy_only_while_it_serves_this_host_is_still_waited_on() -> None:
    """A member that answers busy ("as many pulls in flight here as it may") because it is
    serving this host a chunk (its pull through a slow origin under way, 200 already said)
    serves none until that one lands: past the busy wait from its first busy, every chunk
    asked of it meanwhile went to the origin at once, though it serves them as soon as its
    one pull lands (it was not busy to everything: it was busy with us)."""
    first, later, other = (os.urandom(1000 + i) for i in range(3))
    chunks = [mf.Chunk(id=chunk_id(d), size=len(d)) for d in (first, later, other)]
    landed = asyncio.Event()

    class Pulling(Answering):
        async def have(self, name: str, cids: list[bytes]) -> set[bytes]:
            return set()

        async def chunk(
            self, name: str, chunk: mf.Chunk, pull: bool, answered: asyncio.Event | None = None
        ) -> tuple[memoryview, str]:
            if chunk.id == chunks[0].id:  # said 200 at once; its pull lands in 0.7 s
                if answered is not None:
                    answered.set()
                await asyncio.sleep(0.7)
                landed.set()
                return memoryview(first), "pull"
            if not landed.is_set():
                raise PeerFailure("busy", f"peer {name}: as many pulls in flight as it may")
            return memoryview(later if chunk.id == chunks[1].id else other), "held"

    client = Pulling("me", None, 5.0, 10.0)
    m = Membership(("10.0.0.2:7460",), (), 10.0, client)
    await m.refresh()
    for due in m.roster.due(time.monotonic()):
        await m.probe(due)
    source = PeerSource(m, client, 5.0, busy_wait=0.4)
    pulled = asyncio.create_task(source.get(chunks[0]))
    busy = asyncio.create_task(source.get(chunks[2]))  # busy the whole wait: the origin's
    try:
        async with asyncio.timeout(10):
            await asyncio.sleep(0.5)
            assert bytes(await source.get(chunks[1])) == later  # served once the pull landed
            assert bytes(await pulled) == first
    finally:
        for t in (pulled, busy):
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        await client.close()


async def test_asks_whether_a_member_holds_chunks_go_one_request_at_a_time() -> None:
    """A restore's fetches ask a member about many chunks at once. A request each went past
    the unproven bodies a member reads from one host at a time (16): the rest were answered
    busy, read as "does not hold it", and a host joining a fleet that held every chunk read
    its own share from the origin. The asks of a turn of the loop go in one request now, and
    those made while it is out in the next, one at a time."""
    held = {os.urandom(32) for _ in range(200)}
    in_flight, most, requests = 0, 0, 0

    class Counting(Answering):
        async def have(self, name: str, cids: list[bytes]) -> set[bytes]:
            nonlocal in_flight, most, requests
            in_flight, requests = in_flight + 1, requests + 1
            most = max(most, in_flight)
            try:
                await asyncio.sleep(0.01)
                if in_flight > 16:
                    raise PeerFailure("busy", f"peer {name}: as many unproven bodies as it may")
                return held & set(cids)
            finally:
                in_flight -= 1

    client = Counting("me", None, 5.0, 10.0)
    m = Membership(("10.0.0.2:7460",), (), 10.0, client)
    await m.refresh()
    source = PeerSource(m, client, 5.0)
    asked = [*held, *(os.urandom(32) for _ in range(100))]
    try:
        async with asyncio.timeout(10):
            first = await asyncio.gather(*(source._has("10.0.0.2:7460", c) for c in asked[:150]))
            rest = await asyncio.gather(
                *(source._has("10.0.0.2:7460", c) for c in asked[150:]),
                *(source._has("10.0.0.2:7460", c) for c in asked[:10]),  # (answered: kept)
            )
    finally:
        await client.close()
    assert [*first, *rest[:150]] == [c in held for c in asked]
    assert all(rest[150:])
    assert (most, requests) == (1, 2)


async def test_asks_waiting_behind_a_have_that_stalls_are_answered_with_it() -> None:
    """A member that stalls on `have` is struck by the request that timed out. The asks made
    while that request was out waited for it: another request to the member the placement no
    longer holds would cost them a timeout more (twice a timeout in all, and each of them a
    holder lookup of every restore that asked)."""
    name = "10.0.0.2:7460"
    asked: list[list[bytes]] = []
    out, queued = asyncio.Event(), asyncio.Event()

    class Stalling(Answering):
        async def have(self, name: str, cids: list[bytes]) -> set[bytes]:
            asked.append(cids)
            out.set()
            await queued.wait()
            raise PeerFailure("stall", f"peer {name} sent no answer in 5 s")

    client = Stalling("me", None, 5.0, 10.0)
    m = Membership((name,), (), 10.0, client)
    await m.refresh()
    source = PeerSource(m, client, 5.0)
    try:
        async with asyncio.timeout(10):
            first = asyncio.ensure_future(source._has(name, os.urandom(32)))
            await out.wait()
            second = asyncio.ensure_future(source._has(name, os.urandom(32)))
            await asyncio.sleep(0)  # (its ask is made: the next request's)
            assert name in source._asking
            queued.set()
            assert (await first, await second) == (False, False)
    finally:
        await client.close()
    assert name not in m.current().members  # struck
    assert len(asked) == 1
    assert not source._asker
    assert not source._asking


async def test_an_ask_for_a_chunk_a_have_request_out_carries_waits_for_that_answer() -> None:
    """Asked again while a request that carries it is out, a chunk went into the next
    request too, and its fetch waited for two."""
    name, cid = "10.0.0.2:7460", os.urandom(32)
    requests: list[list[bytes]] = []
    out, release = asyncio.Event(), asyncio.Event()

    class Slow(Answering):
        async def have(self, name: str, cids: list[bytes]) -> set[bytes]:
            requests.append(cids)
            out.set()
            await release.wait()
            return set(cids)

    client = Slow("me", None, 5.0, 10.0)
    m = Membership((name,), (), 10.0, client)
    await m.refresh()
    source = PeerSource(m, client, 5.0)
    try:
        async with asyncio.timeout(10):
            first = asyncio.ensure_future(source._has(name, cid))
            await out.wait()
            again = asyncio.ensure_future(source._has(name, cid))
            await asyncio.sleep(0)
            release.set()
            assert (await first, await again) == (True, True)
    finally:
        await client.close()
    assert requests == [[cid]]
    assert not source._asker


async def test_every_peer_stalling_at_once_is_this_host_cut_off_not_each_struck() -> None:
    """A host whose link went down sees every peer stall within a timeout or two, and struck
    each for 30 s: once the link was back it still read everything from the origin until
    the strikes ran out. Every live member stalling at once is counted as this host cut off:
    they are dead, probed, and live again at the first answer. One that stalls alone is
    struck, as before."""
    names = ["10.0.0.2:7460", "10.0.0.3:7460", "10.0.0.4:7460"]
    reachable = asyncio.Event()

    class Link(PeerClient):
        async def health(
            self, name: str, challenge: str = ""
        ) -> tuple[dict[str, Any], tuple[str, int] | None]:
            if not reachable.is_set():
                raise PeerFailure("dead", f"peer {name}: no connection in 2 s")
            return {"node": name}, ("127.0.0.1", 40000)

    client = Link("me", None, 2.0, 10.0)
    m = Membership(tuple(names), (), 3600.0, client)
    await m.refresh()
    now = m.clock()
    for n in names:
        m.roster.answered(n, now)
    try:
        m.report(names[0], PeerFailure("stall", "sent no answer in 2 s"))
        assert m.roster.members[names[0]].state is State.STRUCK  # alone so far: struck
        m.report(names[1], PeerFailure("stall", "sent no answer in 2 s"))
        m.report(names[2], PeerFailure("stall", "sent no answer in 2 s"))
        assert {m.roster.members[n].state for n in names} == {State.DEAD}
        assert m.placement() == []  # (nothing asked of them meanwhile)
        reachable.set()  # the link is back: the next probes find them
        for due in m.roster.due(m.clock() + 1.5):
            await m.probe(due)
        assert {m.roster.members[n].state for n in names} == {State.LIVE}
    finally:
        await client.close()


async def test_requests_in_flight_to_members_counted_cut_off_strike_none_and_revive_none() -> None:
    """A host cut off has many requests out to each member: they stall one after another,
    after the first of each counted every member dead. Those that come in later are the
    same cut-off, not a member struck alone (for 30 s, and more at its next strike); and
    one to a member struck a while ago, once no member is live, is not every live member
    stalling at once: it brings back no member struck for its own stalls."""
    names = ["10.0.0.2:7460", "10.0.0.3:7460", "10.0.0.4:7460"]
    t = [0.0]
    client = PeerClient("me", None, 2.0, 10.0)
    m = Membership(tuple(names), (), 3600.0, client, clock=lambda: t[0])
    await m.refresh()
    for n in names:
        m.roster.answered(n, 0.0)
    stall = PeerFailure("stall", "sent no answer in 2 s")
    try:
        for n in names * 3:  # each member's first request, then the others in flight
            t[0] += 0.1
            m.report(n, stall)
        assert {n: m.roster.members[n].state for n in names} == dict.fromkeys(names, State.DEAD)
        assert max(m.roster.members[n].strikes for n in names) <= 1

        t[0] = 100.0
        for n in names:
            m.roster.answered(n, t[0])
        m.roster.rejected(names[2], t[0], "another secret")
        m.report(names[0], stall)  # stalls alone: struck
        t[0] = 110.0
        m.report(names[1], stall)  # stalls alone, 10 s later: struck
        t[0] = 110.5
        m.report(names[0], stall)  # a request to the first, out since before its strike
        for n in names[:2]:
            assert m.roster.members[n].state is State.STRUCK
    finally:
        await client.close()


async def test_members_that_answer_probes_and_stall_every_chunk_are_struck_not_probed_back() -> (
    None
):
    """Every member stalling at once is this host cut off, once: members that are back at
    the next probe and stall again before serving a chunk (a link that drops big packets,
    members whose disks hang) are struck, each strike longer, not probed back every second
    or two for a timeout's stall of every request each time."""
    names = ["10.0.0.2:7460", "10.0.0.3:7460"]
    t = [0.0]

    class Probed(PeerClient):
        async def health(
            self, name: str, challenge: str = ""
        ) -> tuple[dict[str, Any], tuple[str, int] | None]:
            return {"node": name}, ("127.0.0.1", 40000)

    client = Probed("me", None, 2.0, 10.0)
    m = Membership(tuple(names), (), 3600.0, client, clock=lambda: t[0])
    await m.refresh()
    for n in names:
        m.roster.answered(n, 0.0)
    stall = PeerFailure("stall", "sent no answer in 2 s")
    rounds = 0
    try:
        while t[0] < 600.0:
            live = [n for n in names if m.roster.members[n].state is State.LIVE]
            if live:
                rounds += 1
                t[0] += 2.0  # asked, and a timeout later: stalled
                for n in live:
                    m.report(n, stall)
            else:
                t[0] += 0.5
                m.roster.tick(t[0])
                for due in m.roster.due(t[0]):
                    await m.probe(due)
        assert rounds <= 12  # (each struck for 30, 60, 120, 240 s: not 200 rounds)
        # one that serves a chunk once it is back: a later cut-off is one again
        m.roster.tick(t[0] + 600.0)
        for n in names:
            m.roster.answered(n, t[0], served=True)
        t[0] += 10.0
        for n in names:
            m.report(n, stall)
        assert {m.roster.members[n].state for n in names} == {State.DEAD}
    finally:
        await client.close()
