"""Fleet scale by simulation: hostd's own placement, ownership and fetch scheduling, driven in
virtual time over a model of N hosts.

    .venv/bin/python bench/simulate.py [--hosts 8,1000] [--size 256MiB] [--churn 0.1]
        [--origin-rate 400mbit] [--host-rate 1gbit] [--json OUT]

What is real: each simulated host runs hostd's `Fetcher` (single flights, priority limiter),
`PeerSource` (owner first, holders, hedging, busy rounds), `Membership`/`Roster` (live, dead,
struck; rendezvous placement), `OriginPull` with its shared flight and the owner's
`ChunkBuffer`, and the serving side's `Uploads` gate (upload slots, busy answers with the
hosts already served). What is modelled: the network and the origin. Every link (a host's
upload, a host's download, the origin's upload) is a queue that sends one transfer at a
time at its rate (a transfer takes the sender's upload and the receiver's download together),
plus a one-way latency per request; the peer server's choice of what to serve (held, pulled
through, busy) is the few lines of api_peer.chunk, written again here over the model. Bytes
are not hashed (the real client verifies; nothing here can be corrupt).

With --machine-cores and --cpu-per-gib, the hosts also share one machine's CPUs, each chunk
received costing that much CPU: what the namespace bench (8 hosts on one 2-core machine)
adds to the network, for comparing the two; a fleet's hosts each have their own.

Time is virtual: an event loop whose clock jumps to the next timer when nothing is ready,
so 1,000 hosts pulling a snapshot take seconds of CPU, and the same seed gives the same run.

For each N it reports the origin's egress (in snapshots), the time until every host holds
the snapshot against the bound max(S/B_o, S/B_p), and the most any host uploaded against
the fair share (all bytes hosts sent each other, divided by N). With --churn, that share of
the hosts leaves part way (their restores stop; others learn at the next DNS refresh, and
sooner by the failed requests) and as many new hosts join and restore.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import selectors
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hostd.config import DEFAULT_MAX_UPLOADS
from hostd.core import rendezvous
from hostd.core.manifest import Chunk
from hostd.core.units import parse_size
from hostd.errors import ChunkMissing, HostdError
from hostd.fetch import Fetcher
from hostd.peers import (
    PULL_PRIORITY,
    ChunkBuffer,
    Membership,
    OriginPull,
    PeerClient,
    PeerFailure,
    PeerSource,
    Uploads,
)

MiB = 1 << 20


# --- virtual time ---------------------------------------------------------------------------


class _Clockwork(selectors.BaseSelector):
    """A selector with no I/O: waiting for `timeout` moves the loop's clock on by it."""

    def __init__(self) -> None:
        self.loop: VirtualLoop | None = None
        self._map: dict[int, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._map[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._map.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        assert self.loop is not None
        if timeout is None:
            raise RuntimeError("simulation deadlock: nothing scheduled and nothing ready")
        self.loop.now += timeout
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        clockwork = _Clockwork()
        super().__init__(clockwork)
        clockwork.loop = self

    def time(self) -> float:
        return self.now


# --- the model ------------------------------------------------------------------------------


@dataclass
class Model:
    hosts: int
    size: int  # snapshot bytes
    chunk_size: int = 4 * MiB
    host_rate: float = 1e9 / 8  # bytes/s, each way
    origin_rate: float = 400e6 / 8
    latency: float = 0.0002  # one way, host to host
    origin_latency: float = 0.02  # first byte from the origin
    fetch_concurrency: int = 16
    max_uploads: int = DEFAULT_MAX_UPLOADS
    hedge_after: float = 0.2
    timeout: float = 5.0
    dns_refresh: float = 10.0
    churn: float = 0.0
    churn_at: float = 0.3  # when, as a share of the bound
    seed: int = 1
    # Hosts sharing one machine's CPUs (the namespace bench: 8 hosts on 2 cores): each chunk
    # a host receives costs `cpu_per_gib` CPU seconds per GiB (verify, write, serve it on),
    # on `machine_cores` cores shared by all. 0: every host has CPU to spare (a fleet).
    machine_cores: int = 0
    cpu_per_gib: float = 0.0

    @property
    def bound(self) -> float:
        return max(self.size / self.origin_rate, self.size / self.host_rate)


class Net:
    """Links as queues. A transfer waits for the sender's upload (first come, first served),
    then for the receiver's download to be free, and holds both for size / rate. A transfer
    from the origin holds only the origin's link (slower than any host's)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.up: dict[str, asyncio.Lock] = {}
        self.down_free: dict[str, float] = {}
        self.sent: Counter[str] = Counter()
        self.origin_done = 0.0  # when the origin sent its last byte

    async def transfer(self, src: str, dst: str, size: int) -> None:
        loop = asyncio.get_running_loop()
        origin = src == "origin"
        await asyncio.sleep(self.model.origin_latency if origin else self.model.latency)
        rate = min(self.model.origin_rate if origin else self.model.host_rate, self.model.host_rate)
        async with self.up.setdefault(src, asyncio.Lock()):
            # The origin's link is slower than a host's: its transfer leaves room on the
            # receiver's download, and is not made to wait for it (the origin never idles).
            start = loop.time() if origin else max(loop.time(), self.down_free.get(dst, 0.0))
            end = start + size / rate
            if not origin:
                self.down_free[dst] = end
            self.sent[src] += size
            if origin:
                self.origin_done = end
            await asyncio.sleep(end - loop.time())


class SimClient(PeerClient):
    """The peer client over the model: asks the simulated host by name."""

    def __init__(self, sim: Sim, host: SimHost) -> None:
        super().__init__(host.name, None, sim.model.timeout, 2 * sim.model.timeout)
        self.sim = sim
        self.host = host
        self.name = host.name

    async def chunk(
        self, name: str, chunk: Chunk, pull: bool, answered: asyncio.Event | None = None
    ) -> tuple[memoryview, str]:
        peer = self.sim.hosts.get(name)
        await asyncio.sleep(self.sim.model.latency)
        if peer is None or not peer.up:
            raise PeerFailure("dead", f"peer {name}: Connection refused")
        self.stats.requests[("chunk", "sent")] += 1
        data, how = await peer.serve(chunk, pull, self.host.name, answered)
        return memoryview(data), how

    async def have(self, name: str, cids: list[bytes]) -> set[bytes]:
        peer = self.sim.hosts.get(name)
        await asyncio.sleep(2 * self.sim.model.latency)
        if peer is None or not peer.up:
            raise PeerFailure("dead", f"peer {name}: Connection refused")
        self.stats.requests[("have", "sent")] += 1
        return {c for c in cids if peer.holds(c)}

    async def health(
        self, name: str, challenge: str = ""
    ) -> tuple[dict[str, Any], tuple[str, int] | None]:
        raise AssertionError("the simulation does not probe")


class StoreSource:
    """The host's own complete chunks (its tiers, in the real daemon)."""

    name = "dedup"

    def __init__(self, host: SimHost) -> None:
        self.host = host

    async def get(self, chunk: Chunk) -> bytes:
        if chunk.id not in self.host.store:
            raise ChunkMissing("not held")
        return self.host.sim.data(chunk.size)


class OriginModel:
    name = "origin"

    def __init__(self, host: SimHost) -> None:
        self.host = host

    async def get(self, chunk: Chunk) -> bytes:
        await self.host.sim.net.transfer("origin", self.host.name, chunk.size)
        self.host.sim.origin_chunks[chunk.id] += 1
        return self.host.sim.data(chunk.size)


class SimHost:
    def __init__(self, sim: Sim, name: str, names: list[str]) -> None:
        m = sim.model
        self.sim = sim
        self.name = name
        self.up = True
        self.store: set[bytes] = set()
        self.done_at: float | None = None
        self.client = SimClient(sim, self)
        loop = asyncio.get_running_loop()
        self.membership = Membership(
            (), (), m.dns_refresh, self.client, clock=loop.time, placements=sim.placements
        )
        self.see(names)
        self.buffer = ChunkBuffer(256 * MiB)
        self.pull = OriginPull(
            Fetcher([self.buffer, OriginModel(self)], m.fetch_concurrency),
            self.buffer,
            self.membership.owns,
        )
        self.source = PeerSource(
            self.membership, self.client, m.hedge_after, random.Random(sim.rng.random())
        )
        self.fetcher = Fetcher(
            [StoreSource(self), self.buffer, self.source, self.pull], m.fetch_concurrency
        )
        self.uploads = Uploads(m.max_uploads, random.Random(sim.rng.random()))

    def see(self, names: list[str]) -> None:
        """Take a new member list (what a DNS refresh gives)."""
        r = self.membership.roster
        added, _ = r.update(dict.fromkeys(names, "dns"), asyncio.get_running_loop().time())
        for n in added:
            r.members[n].probed = True  # no probes: requests tell live from dead
        r.mark_self(self.name, 0.0)

    def holds(self, cid: bytes) -> bool:
        return cid in self.store or self.buffer.peek(cid) is not None

    async def serve(
        self, chunk: Chunk, pull: bool, asker: str, answered: asyncio.Event | None
    ) -> tuple[bytes, str]:
        """What api_peer.chunk decides, over the model."""
        held = self.holds(chunk.id)
        if not held and not pull:
            raise PeerFailure("missing", f"peer {self.name}: not held")
        patience = self.sim.model.hedge_after / 2
        if (hint := await self.uploads.admit(chunk.id, asker, patience)) is not None:
            raise PeerFailure("busy", f"peer {self.name}: busy", hint)
        with self.uploads.taken():
            if answered is not None:
                answered.set()  # the status line goes out before a pull
            if not held:
                try:
                    await self.pull.fetch(chunk, PULL_PRIORITY)
                except HostdError as e:
                    raise PeerFailure("failed", f"peer {self.name}: {e.message}") from None
                self.sim.pulls += 1
            with self.uploads.sending():
                if not self.up:
                    raise PeerFailure("failed", f"peer {self.name} went away")
                await self.sim.net.transfer(self.name, asker, chunk.size)
        self.uploads.served(chunk.id, asker)
        return self.sim.data(chunk.size), "held" if held else "pull"

    async def restore(self, chunks: list[Chunk]) -> None:
        it = iter(enumerate(chunks))

        async def worker() -> None:
            for n, c in it:
                await self.fetcher.get(c, (0, n))
                if self.sim.cpu is not None:
                    async with self.sim.cpu:
                        await asyncio.sleep(c.size / (1 << 30) * self.sim.model.cpu_per_gib)
                self.store.add(c.id)

        async with asyncio.TaskGroup() as tg:
            for _ in range(self.sim.model.fetch_concurrency):
                tg.create_task(worker())
        self.done_at = asyncio.get_running_loop().time()

    async def close(self) -> None:
        await self.fetcher.close()
        await self.pull.fetcher.close()


class Sim:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.rng = random.Random(model.seed)
        self.net = Net(model)
        self.hosts: dict[str, SimHost] = {}
        self.placements: dict[frozenset[str], rendezvous.Placement] = {}
        self.origin_chunks: Counter[bytes] = Counter()
        self.cpu = asyncio.Semaphore(model.machine_cores) if model.machine_cores else None
        self.pulls = 0
        self._data: dict[int, bytes] = {}

    def data(self, size: int) -> bytes:
        got = self._data.get(size)
        if got is None:
            got = self._data[size] = bytes(size)
        return got

    def chunks(self) -> list[Chunk]:
        out, left = [], self.model.size
        while left > 0:
            n = min(left, self.model.chunk_size)
            out.append(Chunk(self.rng.randbytes(32), n))
            left -= n
        return out

    async def run(self) -> dict[str, Any]:
        m = self.model
        names = [f"10.{i // 250}.{i % 250}.1:7460" for i in range(m.hosts)]
        for n in names:
            self.hosts[n] = SimHost(self, n, names)
        chunks = self.chunks()
        tasks = {n: asyncio.ensure_future(h.restore(chunks)) for n, h in self.hosts.items()}
        left: list[str] = []
        joined: list[str] = []
        if m.churn:
            k = max(1, round(m.hosts * m.churn / 2))
            await asyncio.sleep(m.bound * m.churn_at)
            left = self.rng.sample(names, k)
            for n in left:
                self.hosts[n].up = False
                tasks.pop(n).cancel()
            joined = [f"10.{200 + i // 250}.{i % 250}.1:7460" for i in range(k)]
            now_listed = [n for n in names if n not in left] + joined
            for n in joined:
                self.hosts[n] = SimHost(self, n, now_listed)
                tasks[n] = asyncio.ensure_future(self.hosts[n].restore(chunks))
            await asyncio.sleep(m.dns_refresh)  # the others learn at their next refresh
            for n in now_listed:
                if n not in joined:
                    self.hosts[n].see(now_listed)
        await asyncio.gather(*tasks.values())
        for h in self.hosts.values():
            await h.close()
        return self.report(names, left, joined, chunks)

    def report(
        self, names: list[str], left: list[str], joined: list[str], chunks: list[Chunk]
    ) -> dict[str, Any]:
        m = self.model
        done = [h.done_at for h in self.hosts.values() if h.done_at is not None]
        stayed = [t for n in names if n not in left and (t := self.hosts[n].done_at) is not None]
        peer_sent = {n: s for n, s in self.net.sent.items() if n != "origin"}
        fair = sum(peer_sent.values()) / max(1, len(self.hosts) - len(left))
        egress = self.net.sent["origin"] / m.size
        return {
            "hosts": m.hosts,
            "churn": m.churn,
            "chunks": len(chunks),
            "origin_egress_snapshots": round(egress, 3),
            "origin_fetches_per_chunk_max": max(self.origin_chunks.values()),
            "completion_s": round(max(stayed), 3),
            "completion_all_s": round(max(done), 3),
            "bound_s": round(m.bound, 3),
            "origin_done_s": round(self.net.origin_done, 3),
            "median_s": round(sorted(stayed)[len(stayed) // 2], 3),
            "completion_over_bound": round(max(stayed) / m.bound, 3),
            "max_upload_over_fair": round(max(peer_sent.values()) / fair, 2) if fair else 0.0,
            "pull_throughs": self.pulls,
            "busy_waits": sum(h.client.stats.busy_waits for h in self.hosts.values()),
            "hedges": sum(h.client.stats.hedges["started"] for h in self.hosts.values()),
            "left": len(left),
            "joined": len(joined),
        }


def simulate(model: Model) -> dict[str, Any]:
    loop = VirtualLoop()
    try:
        started = time.process_time()
        out = loop.run_until_complete(Sim(model).run())
        out["cpu_s"] = round(time.process_time() - started, 1)
        return out
    finally:
        loop.close()


def _rate(text: str) -> float:
    """Bytes/s from "400mbit", "1gbit" (bits, powers of 1000), or a size per second."""
    t = text.lower()
    for unit, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if t.endswith(unit):
            return float(t[: -len(unit)]) * mult / 8
    return float(parse_size(text, "rate"))


def runs(args: argparse.Namespace) -> Iterator[Model]:
    for n in (int(x) for x in args.hosts.split(",")):
        for churn in (0.0, args.churn) if args.churn else (0.0,):
            yield Model(
                hosts=n,
                size=parse_size(args.size, "--size"),
                host_rate=_rate(args.host_rate),
                origin_rate=_rate(args.origin_rate),
                churn=churn,
                seed=args.seed,
                machine_cores=args.machine_cores,
                cpu_per_gib=args.cpu_per_gib,
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", default="8,1000")
    p.add_argument("--size", default="256MiB")
    p.add_argument("--origin-rate", default="400mbit")
    p.add_argument("--host-rate", default="1gbit")
    p.add_argument("--churn", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--machine-cores", type=int, default=0, help="hosts share this many cores")
    p.add_argument("--cpu-per-gib", type=float, default=0.0, help="CPU s per GiB received")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results = []
    cols = [
        "hosts",
        "churn",
        "origin_egress_snapshots",
        "completion_s",
        "median_s",
        "origin_done_s",
        "bound_s",
        "completion_over_bound",
        "max_upload_over_fair",
        "pull_throughs",
        "busy_waits",
        "hedges",
        "cpu_s",
    ]
    print(" ".join(f"{c:>12.12}" for c in cols))
    for model in runs(args):
        r = simulate(model)
        results.append(r)
        print(" ".join(f"{r[c]!s:>12.12}" for c in cols), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
