"""The peer API against askers and members that abuse it: repeated and replayed pulls, pulls
that name bytes that are not the chunk, a member busy to everything, a member whose refusal
text carries control characters (real daemons)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

from harness import free_ports
from test_e2e import sample, wait_for
from test_peers import Fleet, Member, big_tree, member, peer_request, work, wrong_bytes_peer
from test_small_files import small_tree

from hostd.core import manifest as mf
from hostd.core import rendezvous
from hostd.peers import PULL_MISS_BYTES, PULL_WASTE_BURST

__all__ = ["work"]  # the fixture, used by name


class Healthy(Member):
    """A member that is up (its health answers) and holds nothing."""

    def do_GET(self) -> None:
        if self.path.startswith("/v1/chunks/"):
            self.answer(404, b'{"message": "no such chunk"}')
        else:
            self.answer(200, b'{"node": "other"}')


def test_repeated_pulls_of_a_chunk_this_host_does_not_own_read_the_origin_once(
    work: Path,
) -> None:
    """A pull-through asked of a host that is not the chunk's owner (an asker whose
    membership differs, or anyone replaying a captured signed pull to another host: the
    proof names no host) is fetched from the origin and not kept: the same request, again
    and again, made the host read the chunk from its origin each time, without bound."""
    src = big_tree(work / "src")
    (fake,) = free_ports(1)
    stop = threading.Event()
    wrong_bytes_peer(fake, stop, Healthy)
    other = f"127.0.0.1:{fake}"
    try:
        with Fleet(work, 1, extra=[other], secret=False, allow_unauthenticated=True) as fleet:
            fleet.publish(src)
            h = fleet.hosts[0]
            wait_for(lambda: member(h, other).get("state") == "live", "the other member live")
            m = mf.decode(next((work / "origin" / "manifests").iterdir()).read_bytes())
            placement = rendezvous.Placement(frozenset([fleet.addrs[0], other]))
            c = next(
                c
                for f in m.files
                for c in f.chunks
                if c.size > 1 << 20 and placement.owner(c.id) == other
            )
            before = sample(h.metrics(), "hostd_origin_bytes_total", direction="in")
            target = f"/v1/chunks/{c.id.hex()}?size={c.size}&codec={c.codec}&pull=1"
            if (p := c.packed) is not None:
                target += f"&pack={p.pack.hex()}&off={p.offset}&len={p.length}&psize={p.pack_size}"
            for _ in range(10):
                code, body = peer_request_raw(fleet.addrs[0], target)
                assert code == 200
                assert len(body) == c.size
            read = sample(h.metrics(), "hostd_origin_bytes_total", direction="in") - before
            assert read <= 2 * c.size, f"10 pulls of one {c.size}-byte chunk read {read} bytes"
    finally:
        stop.set()


def peer_request_raw(addr: str, path: str) -> tuple[int, bytes]:
    import http.client

    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_tiny_pulls_that_do_not_verify_bar_their_asker_like_misses(work: Path) -> None:
    """A pull that names real bytes at the origin under another id costs the owner a GET
    whatever it reads; it counted as waste only the bytes it named: one byte (size=1, len=1)
    a request, so an address could make the owner GET its origin ~134 million times before
    PULL_WASTE_BURST barred it, far past the PULL_MISS_BYTES a GET for a missing chunk
    counts. It counts as a miss at least."""
    src = small_tree(work / "src", n=5)
    with Fleet(work, 1, secret=False, allow_unauthenticated=True) as fleet:
        fleet.publish(src)
        m = mf.decode(next((work / "origin" / "manifests").iterdir()).read_bytes())
        p = next(c.packed for f in m.files for c in f.chunks if c.packed is not None)
        assert p is not None
        most = PULL_WASTE_BURST // PULL_MISS_BYTES
        pulled = 0
        got, body = 0, dict[str, Any]()
        for i in range(3 * most):
            lie = f"pull=1&pack={p.pack.hex()}&off={p.offset}&len=1&psize={p.pack_size}"
            try:
                got, body = peer_request(fleet.addrs[0], f"/v1/chunks/{i:064x}?size=1&{lie}")
            except (ConnectionError, http.client.HTTPException):
                pulled += 1  # read one byte at the origin, not the chunk: cut
                continue
            break
        assert got == 404, (pulled, got, body)
        assert "no pull is made" in body["message"], body
        assert pulled < 2 * most


class BusyLiar(Member):
    """A member that says it holds every chunk asked about (`have`) and answers every chunk
    request 503 busy, naming no one: never struck (busy is no fault)."""

    def do_POST(self) -> None:
        asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.answer(200, json.dumps({"have": asked.get("ids", [])}).encode())

    def do_GET(self) -> None:
        if self.path.startswith("/v1/chunks/"):
            self.answer(503, b'{"error": "busy", "message": "busy", "holders": []}')
        else:
            self.answer(200, b'{"node": "busy-liar"}')


BUSY_WAIT = 4.0  # 2 x the longer of the fleet's peer timeout (2 s) and request_timeout (2 s)


def test_a_member_that_lies_have_and_answers_busy_is_not_waited_on_for_every_chunk(
    work: Path,
) -> None:
    """A member that says it holds every chunk and answers every request for one busy,
    naming no one, is never struck (busy is no fault), and every chunk it owns, or that this
    host owns (asked of holders), waits the whole busy wait (2 x the longer of the peers'
    timeout and request_timeout: 60 s by default) before the origin: a 40-file restore of
    well under a second took 180 s beside one such member. Here the wait is 4 s; the restore
    must not wait it more than once (12.5 s before), nor the next restore, after an idle
    spell, wait it again (a member stuck busy cost every restore of every host the wait)."""
    src = small_tree(work / "src", n=40)
    (fake,) = free_ports(1)
    stop = threading.Event()
    wrong_bytes_peer(fake, stop, BusyLiar)
    other = f"127.0.0.1:{fake}"
    try:
        with Fleet(
            work,
            1,
            extra=[other],
            secret=False,
            allow_unauthenticated=True,
            config={"request_timeout": "2s"},
        ) as fleet:
            fleet.publish(src)
            h = fleet.hosts[0]
            wait_for(lambda: member(h, other).get("state") == "live", "the other member live")
            t0 = time.monotonic()
            out = h.restore("m/w", work / "t")
            took = time.monotonic() - t0
            assert out["event"] == "result", out
            assert took < 8, (took, member(h, other))
            # Idle past the busy wait, then another snapshot: the member, busy again, was
            # waited on the whole wait again (and after every idle spell, on every host)
            fleet.publish(small_tree(work / "src2", n=40, seed=9), "m/w2")
            time.sleep(BUSY_WAIT + 0.5)  # (the idle spell is the point: nothing to wait for)
            t0 = time.monotonic()
            out = h.restore("m/w2", work / "t2")
            took = time.monotonic() - t0
            assert out["event"] == "result", out
            assert took < BUSY_WAIT - 0.5, (took, member(h, other))
    finally:
        stop.set()


class Forger(Member):
    """A member that refuses every request with a message of its own making: lines of a
    log, in the terminal's escapes."""

    MESSAGE = "no\nERROR hostd.peers: struck 10.0.0.9:7460: forged\x1b[2K"

    def do_GET(self) -> None:
        self.answer(401, json.dumps({"error": "x", "message": self.MESSAGE}).encode())


def test_a_members_refusal_text_cannot_forge_log_lines_or_status(work: Path) -> None:
    """A member's error message (up to 300 characters of its JSON) went as it was into the
    member's last_error (status) and the log: its newlines and escapes forge lines there."""
    (fake,) = free_ports(1)
    stop = threading.Event()
    wrong_bytes_peer(fake, stop, Forger)
    other = f"127.0.0.1:{fake}"
    try:
        with Fleet(work, 1, extra=[other]) as fleet:
            h = fleet.hosts[0]
            wait_for(lambda: member(h, other).get("state") == "rejecting", "it rejecting")
            said = member(h, other).get("last_error", "")
            assert "forged" in said, said
            assert said.isprintable(), said
            assert "\nERROR hostd.peers: struck 10.0.0.9" not in h.log()
    finally:
        stop.set()
