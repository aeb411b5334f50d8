"""Peers on a real namespace cluster: hosts that die, vanish, join, leave, lie, stall or hold
another secret while a restore runs, and an origin that only one host can reach.

Each test builds a Cluster (tests/netns.py): hosts h0.. and an origin, each a network
namespace on one bridge with rate-limited links. The origin namespace serves a snapshot,
published once for the module, over plain HTTP; each host's daemon runs in its namespace
(`ip netns exec`) and is driven over its Unix socket from here. The faults are real: SIGKILL,
a disabled switch port, unreachable routes, sockets that never answer. Every restore must come
out byte-identical to the source tree, and the daemons' status or metrics must say what
happened. Waits poll against deadlines; nothing sleeps for a fixed time.

The same features over loopback, with finer checks, are in tests/test_peers.py.
"""

from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from harness import Hostd, iter_events, outcome, rmtree, short_tmp, tree_digest
from netns import ORIGIN, Cluster, require_netns, serve_dir
from test_e2e import sample, wait_for
from test_peers import WrongBytes, key_file, member, probed, status_peers

from hostd.core import manifest as mf
from hostd.core import rendezvous

pytestmark = pytest.mark.root

MiB = 2**20
PORT = 7460  # every host's peer port
ORIGIN_PORT = 8080
REF = "m/w"
HOST_RATE = "200mbit"
ORIGIN_RATE = "160mbit"  # below the hosts': a peer is worth asking
SLOW = "80mbit"  # a link slowed so that a restore lasts long enough to act in its middle
JOIN_SLOW = "60mbit"  # ... and long enough for a daemon to start meanwhile, on a busy machine


# --- the snapshot, published once ----------------------------------------------------------


@dataclass(frozen=True)
class Published:
    src: Path
    origin: Path  # the directory the origin namespace serves
    digest: dict[str, Any]
    snapshot: str
    size: int  # bytes of the files
    stored_bytes: int
    chunks: list[bytes]


def source_tree(root: Path) -> Path:
    """32 MiB of random bytes: four files of two 4 MiB chunks and a small tail, and a small
    file. Random, so no chunk is shared and none is stored compressed."""
    rng = random.Random(11)
    root.mkdir(parents=True)
    for i in range(4):
        (root / f"shard-{i}.bin").write_bytes(rng.randbytes(8 * MiB + 4099 * (i + 1)))
    (root / "tokenizer.json").write_text(json.dumps(list(range(2000))))
    return root


def publish(work: Path, **config: Any) -> Published:
    """source_tree published to a file:// origin under `work` (the directory the origin
    namespace will serve), by a daemon with `config`."""
    src = source_tree(work / "src")
    with Hostd(work / "pub", origin=f"file://{work}/origin", **config) as pub:
        out = pub.publish(src, REF)
    origin = work / "origin"
    (manifest,) = (origin / "manifests").iterdir()
    chunks = sorted(c.id for f in mf.decode(manifest.read_bytes()).files for c in f.chunks)
    return Published(
        src,
        origin,
        tree_digest(src),
        out["snapshot"],
        out["bytes"],
        out["stored_bytes"],
        chunks,
    )


@pytest.fixture(scope="module")
def published() -> Iterator[Published]:
    require_netns()
    work = short_tmp("pcs")
    try:
        # pack_size 0: the shards' chunks are objects of their own (below)
        p = publish(work, pack_size=0)
        assert len(p.chunks) == 13, p.chunks
        # the shards' chunks are objects of their own; the tokenizer lies in a pack
        assert len(list((p.origin / "chunks").glob("*/*"))) == 12
        assert len(list((p.origin / "packs").glob("*/*"))) == 1
        yield p
    finally:
        rmtree(work)


@pytest.fixture(scope="module")
def published_packed() -> Iterator[Published]:
    """The same tree in the default layout: each shard's chunks back to back in a pack of
    its own (pack_size 64MiB), which the origin's plain http.server serves only whole."""
    require_netns()
    work = short_tmp("pcp")
    try:
        p = publish(work)
        assert not (p.origin / "chunks").exists()
        assert len(list((p.origin / "packs").glob("*/*"))) == 5  # a pack a shard, and one more
        yield p
    finally:
        rmtree(work)


# --- a cluster with daemons ----------------------------------------------------------------


class Site:
    """A Cluster whose origin serves the published snapshot over HTTP, and a hostd daemon per
    host that lists every host (itself included) as a peer on PORT."""

    def __init__(
        self,
        published: Published,
        hosts: int,
        *,
        timeout: str = "2s",
        host_rate: str = HOST_RATE,
        origin_rate: str = ORIGIN_RATE,
        **config: Any,
    ) -> None:
        self.published = published
        self.timeout = timeout
        # Two chunks at a time: chunks then land one after the other rather than all at the
        # end, so progress events show bytes done early and later chunks ask anew.
        self.config = {"fetch_concurrency": 2, **config}
        self.daemons: dict[str, Hostd] = {}
        self.work = short_tmp("pc")
        self.key = key_file(self.work / "cluster.key")
        try:
            self.cluster = Cluster(hosts, host_rate=host_rate, origin_rate=origin_rate)
        except BaseException:
            rmtree(self.work)
            raise
        try:
            serve_dir(self.cluster, ORIGIN, published.origin, ORIGIN_PORT)
        except BaseException:
            self.close()
            raise
        self.origin_url = f"http://{self.cluster.addr(ORIGIN)}:{ORIGIN_PORT}"
        self.addrs = {h: f"{self.cluster.addr(h)}:{PORT}" for h in self.cluster.hosts}

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            with ThreadPoolExecutor(max(1, len(self.daemons))) as ex:
                list(ex.map(Hostd.close, self.daemons.values()))
        finally:
            try:
                self.cluster.close()
            finally:
                rmtree(self.work)

    def daemon(self, name: str, key: Path | None = None) -> Hostd:
        """Host `name`'s daemon, made (not started) at the first call."""
        if name not in self.daemons:
            self.daemons[name] = Hostd(
                self.work / name,
                wrap=["ip", "netns", "exec", self.cluster.ns(name)],
                origin=self.origin_url,
                access={"link_to_writers": True},
                peers={
                    "listen": self.addrs[name],
                    "static": list(self.addrs.values()),
                    "secret_file": str(key or self.key),
                    "timeout": self.timeout,
                    "hedge_after": "200ms",
                },
                **self.config,
            )
        return self.daemons[name]

    def start(self, *names: str) -> list[Hostd]:
        hosts = [self.daemon(n) for n in names]
        with ThreadPoolExecutor(len(hosts)) as ex:
            list(ex.map(lambda h: h.start(), hosts))
        return hosts

    def wait_live(self, *names: str) -> None:
        """Until each of these hosts sees every other one live: hosts started together may
        probe each other before all listen, and count each other dead for a moment."""
        for n in names:
            wait_members(self.daemon(n), {self.addrs[o]: ("live",) for o in names if o != n})

    def target(self, name: str) -> Path:
        return self.work / f"t-{name}"

    def restore(self, name: str) -> dict[str, Any]:
        """A restore on `name` that must succeed, exactly."""
        out = self.daemon(name).restore(REF, self.target(name))
        self.check(name, out)
        return out

    def check(self, name: str, out: Mapping[str, Any]) -> None:
        assert out["event"] == "result", (name, out, self.daemon(name).log()[-4000:])
        assert tree_digest(self.target(name)) == self.published.digest
        got = out["bytes_by_source"]
        assert sum(got.values()) == out["bytes"] == self.published.size, got

    def restore_acting(
        self, name: str, act: Callable[[dict[str, Any]], bool]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A restore on `name`, calling `act` with each progress event until it returns True;
        returns the final event (checked as restore does) and the progress events after the
        one it acted on."""
        events: list[dict[str, Any]] = []
        acted_at: int | None = None
        body = {"ref": REF, "target": str(self.target(name))}
        for ev in iter_events(self.daemon(name).socket, "/v1/restore", body):
            events.append(ev)
            if acted_at is None and ev["event"] == "progress" and act(ev):
                acted_at = len(events)
        out = outcome(events)
        self.check(name, out)
        assert acted_at is not None, f"the restore ended before the act: {events}"
        return out, events[acted_at:-1]


def members_by_address(h: Hostd) -> dict[str, dict[str, Any]]:
    return {m["address"]: m for m in status_peers(h)["members"]}


def wait_members(
    h: Hostd, want: Mapping[str, Collection[str]], timeout: float = 20.0
) -> dict[str, dict[str, Any]]:
    """Poll `h`'s status until each member named in `want` is in one of its states."""
    deadline = time.monotonic() + timeout
    while True:
        got = members_by_address(h)
        if all(got.get(a, {}).get("state") in states for a, states in want.items()):
            return got
        if time.monotonic() > deadline:
            seen = {a: got.get(a, {}).get("state") for a in want}
            raise AssertionError(f"{h.root.name}: members {seen} after {timeout}s, want {want}")
        time.sleep(0.02)


def bytes_done(ev: Mapping[str, Any]) -> bool:
    """Some bytes of the restore are in, and not yet all of them."""
    return 0 < int(ev["done_bytes"]) < int(ev["total_bytes"])


def metric(h: Hostd, name: str, **labels: str) -> float:
    return sample(h.metrics(), name, **labels)


def busy(h: Hostd) -> bool:
    """Whether `h` is still running an operation (the restore acted on is not over)."""
    code, st = h.api("GET", "/v1/status")
    assert code == 200, st
    return int(st["in_flight"]) > 0


# --- fake peers in a namespace -------------------------------------------------------------


def listening(cluster: Cluster, name: str, port: int) -> socket.socket:
    """A listening socket at name:port, in that node's namespace; nobody accepts from it,
    but the kernel completes the handshakes and takes the requests into its buffer."""
    s = cluster.socket(name)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((cluster.addr(name), port))
        s.listen(64)
    except BaseException:
        s.close()
        raise
    return s


@dataclass
class Served:
    server: ThreadingHTTPServer
    thread: threading.Thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def serve_in(
    cluster: Cluster, name: str, port: int, handler: type[BaseHTTPRequestHandler]
) -> Served:
    """An HTTP server of this process, listening at name:port in that node's namespace."""
    server = ThreadingHTTPServer(("", 0), handler, bind_and_activate=False)
    server.socket.close()
    server.socket = listening(cluster, name, port)
    server.server_address = server.socket.getsockname()
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"fake-{name}", daemon=True)
    thread.start()
    return Served(server, thread)


def peer_get(cluster: Cluster, via: str, addr: str, path: str) -> tuple[int, Any]:
    """A plain GET of the peer API at `addr`, from node `via`'s namespace, with no proof."""
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    s = cluster.socket(via)
    try:
        s.settimeout(10)
        s.connect((host, int(port)))
        conn.sock = s
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, (resp.getheader("Content-Type"), json.loads(resp.read()))
    finally:
        conn.close()
        s.close()


# --- the tests -----------------------------------------------------------------------------


def test_a_peer_killed_in_the_middle_of_a_transfer(published: Published) -> None:
    require_netns()
    with Site(published, 3) as site:
        (a,) = site.start("h0")  # alone: A gets every chunk from the origin, and holds them
        site.restore("h0")
        b, _ = site.start("h1", "h2")  # they hold nothing
        site.wait_live("h0", "h1", "h2")
        site.cluster.set_rate("h1", SLOW)
        killed: list[tuple[int, bool]] = []

        def kill_a(ev: dict[str, Any]) -> bool:
            if not bytes_done(ev):
                return False
            a.kill()
            killed.append((int(ev["done_bytes"]), busy(b)))
            return True

        out, _ = site.restore_acting("h1", kill_a)
        ((done_before, running),) = killed
        assert running, "B's restore was over when A was killed"
        got = out["bytes_by_source"]
        # What B had before the kill came from peers (A holds everything; h2 pulls through
        # what it owns); after it, the rest from h2 or from the origin.
        assert got["peer"] >= done_before > 0, (got, done_before)
        assert got["peer"] + got["origin"] + got.get("buffer", 0) == out["bytes"], got
        dead = wait_members(b, {site.addrs["h0"]: ("dead",)}, timeout=5)[site.addrs["h0"]]
        assert "refused" in dead["last_error"].lower(), dead
        assert metric(b, "hostd_peers", state="dead") == 1


def test_a_peer_partitioned_away_in_the_middle_of_a_restore(published: Published) -> None:
    require_netns()
    with Site(published, 3, timeout="1s") as site:
        site.start("h0")
        site.restore("h0")
        b, _ = site.start("h1", "h2")
        site.wait_live("h0", "h1", "h2")
        site.cluster.set_rate("h1", SLOW)
        cut: list[bool] = []

        def partition_a(ev: dict[str, Any]) -> bool:
            if not bytes_done(ev):
                return False
            site.cluster.partition("h0")
            cut.append(busy(b))
            return True

        started = time.monotonic()
        out, _ = site.restore_acting("h1", partition_a)
        took = time.monotonic() - started
        assert cut == [True], "B's restore was over when A was cut off"
        # 32 MiB over B's link takes 3.4 s; each hung request to A costs one peer timeout (1 s)
        assert took < 15, took
        a = members_by_address(b)[site.addrs["h0"]]
        assert a["state"] in ("struck", "dead"), a
        assert out["bytes_by_source"]["peer"] > 0
        text = b.metrics()
        stalls = sample(text, "hostd_peer_strikes_total", reason="stall")
        assert stalls + sample(text, "hostd_peers", state="dead") >= 1


def test_a_host_joins_and_another_leaves_during_a_restore(published: Published) -> None:
    require_netns()
    with Site(published, 4) as site:
        (h0,) = site.start("h0")
        site.restore("h0")
        h1, h2 = site.start("h1", "h2")
        site.wait_live("h0", "h1", "h2")
        joiner = site.addrs["h3"]
        for h in (h0, h1, h2):
            wait_members(h, {joiner: ("dead",)})  # listed, never started
        site.cluster.set_rate("h1", JOIN_SLOW)
        stopped: list[bool] = []

        def join() -> bool:
            site.start("h3")
            return busy(h1)

        with ThreadPoolExecutor(1) as ex:
            joining: list[Future[bool]] = []

            def join_and_leave(ev: dict[str, Any]) -> bool:
                if not joining:  # a daemon takes a while to start: begin at once
                    joining.append(ex.submit(join))
                if not bytes_done(ev):
                    return False
                h2.signal(signal.SIGTERM)
                stopped.append(busy(h1))
                return True

            site.restore_acting("h1", join_and_leave)
            joined_during = joining[0].result()
        assert stopped == [True], "h1's restore was over when h2 was stopped"
        assert joined_during, "h1's restore was over when h3 had started"
        assert h2.wait(30) == 0, h2.log()[-4000:]
        for h in (h0, h1):
            wait_members(h, {joiner: ("live",)}, timeout=5)
        # the joined host restores from the hosts that hold the snapshot
        h3 = site.daemon("h3")
        wait_members(h3, {site.addrs["h0"]: ("live",), site.addrs["h1"]: ("live",)})
        out = site.restore("h3")
        assert out["bytes_by_source"]["peer"] > 0, out


def test_a_peer_that_sends_wrong_bytes_is_struck(published: Published) -> None:
    require_netns()
    with Site(published, 3) as site:
        addrs = list(site.addrs.values())

        def owned(n: str) -> int:
            return sum(rendezvous.owner(c, addrs) == site.addrs[n] for c in published.chunks)

        liar = max(site.cluster.hosts, key=owned)  # so that it is asked for some chunks
        fake = serve_in(site.cluster, liar, PORT, WrongBytes)
        try:
            real = [n for n in site.cluster.hosts if n != liar]
            h, _ = site.start(*real)
            site.wait_live(*real)
            wait_members(h, {site.addrs[liar]: ("live",)})  # it answers health as a peer
            out = site.restore(real[0])
            m = member(h, site.addrs[liar])
            assert m["state"] == "struck", m
            assert "does not match its id" in m["last_error"], m
            text = h.metrics()
            assert sample(text, "hostd_peer_strikes_total", reason="corrupt") >= 1
            assert sample(text, "hostd_peers", state="struck") == 1
            assert out["bytes_by_source"]["origin"] > 0
        finally:
            fake.close()


class Relay(BaseHTTPRequestHandler):
    """A member that passes every request on, as it came (proof included), to the host at
    `target`, from its own namespace `via`, and answers with what that host said."""

    cluster: Cluster
    via: str
    target: str

    def do_GET(self) -> None:
        host, port = self.target.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        s = self.cluster.socket(self.via)
        try:
            s.settimeout(10)
            s.connect((host, int(port)))
            conn.sock = s
            keep = ("authorization", "x-hostd-node", "x-hostd-name")
            conn.request(
                "GET",
                self.path,
                headers={k: v for k, v in self.headers.items() if k.lower() in keep},
            )
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_member_that_relays_our_probe_to_us_is_not_taken_for_this_host(
    published: Published,
) -> None:
    """A member that relays a host's probe to that host's own server hands back the host's
    own health answer, node id and all: the host took the relay for itself. Only a probe
    that reaches our server from an address of this host makes a member "self"."""
    require_netns()
    with Site(published, 2) as site:
        relay = type(
            "ToH0", (Relay,), {"cluster": site.cluster, "via": "h1", "target": site.addrs["h0"]}
        )
        fake = serve_in(site.cluster, "h1", PORT, relay)
        try:
            (h,) = site.start("h0")
            wait_for(
                lambda: probed(h, site.addrs["h1"]),
                "h0 to probe the relay",
            )
            assert member(h, site.addrs["h1"])["state"] == "live"
            assert status_peers(h)["self"] == site.addrs["h0"]
        finally:
            fake.close()


def test_a_peer_that_accepts_and_sends_nothing_is_struck(published: Published) -> None:
    require_netns()
    with Site(published, 3, timeout="1s") as site, listening(site.cluster, "h2", PORT):
        h, _ = site.start("h0", "h1")
        site.wait_live("h0", "h1")
        started = time.monotonic()
        site.restore("h0")
        assert time.monotonic() - started < 15
        m = member(h, site.addrs["h2"])
        assert m["state"] == "struck", m
        assert "sent no answer" in m["last_error"], m
        assert metric(h, "hostd_peer_strikes_total", reason="stall") >= 1


def test_requests_without_the_secret_are_refused_and_another_key_is_rejected(
    published: Published,
) -> None:
    require_netns()
    with Site(published, 3) as site:
        site.daemon("h2", key=key_file(site.work / "other.key"))
        h0, h1, odd = site.start("h0", "h1", "h2")
        site.wait_live("h0", "h1")
        code, (ctype, body) = peer_get(site.cluster, "h2", site.addrs["h0"], "/v1/health")
        assert (code, body["error"]) == (401, "unauthorized"), body
        assert ctype.startswith("application/json"), ctype
        assert "Authorization" in body["message"]
        cid = published.chunks[0].hex()
        target = f"/v1/chunks/{cid}?size=4096"
        code, (_, body) = peer_get(site.cluster, ORIGIN, site.addrs["h1"], target)
        assert (code, body["error"]) == (401, "unauthorized"), body
        # the odd host and the others refuse each other's proofs
        theirs = wait_members(odd, {site.addrs[n]: ("rejecting",) for n in ("h0", "h1")})
        assert all("secret" in theirs[site.addrs[n]]["last_error"] for n in ("h0", "h1")), theirs
        for h in (h0, h1):
            wait_members(h, {site.addrs["h2"]: ("rejecting",)})
        out = site.restore("h2")
        assert out["bytes_by_source"]["origin"] == out["bytes"], out
        assert metric(h0, "hostd_peer_refused_total", reason="unauthorized") >= 2


def test_a_listed_host_that_never_started_is_dead_and_the_others_serve(
    published: Published,
) -> None:
    require_netns()
    with Site(published, 3) as site:
        names = ["h0", "h1"]
        hosts = site.start(*names)
        site.wait_live(*names)
        gone = site.addrs["h2"]
        owned = sum(rendezvous.owner(c, site.addrs.values()) == gone for c in published.chunks)
        assert owned > 0  # with every host up it would own some chunks
        with ThreadPoolExecutor(2) as ex:
            outs = list(ex.map(lambda n: site.daemon(n).restore(REF, site.target(n)), names))
        for name, h, out in zip(names, hosts, outs, strict=True):
            site.check(name, out)
            m = member(h, gone)
            assert m["state"] == "dead", m
            assert "refused" in m["last_error"].lower(), m
            assert metric(h, "hostd_peers", state="dead") == 1
        assert sum(o["bytes_by_source"]["peer"] for o in outs) > 0, outs


def test_an_origin_only_one_host_reaches_is_read_once(published: Published) -> None:
    require_netns()
    # retries: an owner that cannot reach the origin gives up on a pull-through soon
    with Site(published, 4, retries=2, retry_base="50ms") as site:
        hosts = site.start(*site.cluster.hosts)
        site.wait_live(*site.cluster.hosts)
        names, others = site.cluster.hosts[1:], hosts[1:]
        origin_sent = site.cluster.tx_bytes(ORIGIN)
        # The peer API serves chunks, not refs or manifests: a host that cannot reach the
        # origin restores a ref only from what it recorded of it. A pin resolves the ref and
        # records its manifest, and fetches no chunk.
        for h in others:
            code, body = h.api("POST", "/v1/pin", {"ref": REF})
            assert (code, body["snapshot"]) == (200, published.snapshot), body
        for n in names:
            site.cluster.block(n, ORIGIN)
        # the chunks' owners cannot pull them through for h0: it reads them all itself
        first = site.restore("h0")
        assert first["bytes_by_source"]["origin"] == first["bytes"], first
        before = [metric(h, "hostd_origin_bytes_total", direction="in") for h in others]
        with ThreadPoolExecutor(len(others)) as ex:
            outs = list(ex.map(lambda n: site.daemon(n).restore(REF, site.target(n)), names))
        for name, h, out, was in zip(names, others, outs, before, strict=True):
            site.check(name, out)
            got = out["bytes_by_source"]
            assert got["origin"] == 0, (name, got)
            assert got["peer"] + got.get("buffer", 0) == out["bytes"], (name, got)
            assert out["stale_ref"] is True, out  # from the record: the origin is out of reach
            assert metric(h, "hostd_origin_bytes_total", direction="in") == was
        sent = site.cluster.tx_bytes(ORIGIN) - origin_sent
        assert published.stored_bytes <= sent <= 1.2 * published.stored_bytes, (
            sent,
            published.stored_bytes,
        )


def test_packs_from_an_origin_without_ranges_are_read_once_by_the_fleet(
    published_packed: Published,
) -> None:
    """A plain web server answers a ranged GET with the whole pack. Every chunk of a shard
    lies in one pack: its chunks' owners would each read the whole pack. Hosts that know
    the origin ignores ranges find a packed chunk's owner by its pack, and the owner cuts
    every chunk of it from one read: the fleet costs the origin about the snapshot."""
    require_netns()
    p = published_packed
    with Site(p, 4, fetch_concurrency=4) as site:
        hosts = site.start(*site.cluster.hosts)
        site.wait_live(*site.cluster.hosts)
        origin_sent = site.cluster.tx_bytes(ORIGIN)
        with ThreadPoolExecutor(len(hosts)) as ex:
            outs = list(
                ex.map(lambda n: site.daemon(n).restore(REF, site.target(n)), site.cluster.hosts)
            )
        for name, out in zip(site.cluster.hosts, outs, strict=True):
            site.check(name, out)
        sent = site.cluster.tx_bytes(ORIGIN) - origin_sent
        # (plus the heads of the ranged tries that found out, and each host's probe)
        assert p.stored_bytes <= sent <= 1.25 * p.stored_bytes, (sent, p.stored_bytes)
        came = sum(metric(h, "hostd_origin_bytes_total", direction="in") for h in hosts)
        assert p.stored_bytes <= came <= sent, (came, sent)  # what came, not what was used
