"""The composition root: builds the concrete parts from a Config and runs the daemon.

`serve(config, shutdown=...)` owns every long-lived task. Signals only set events. Stopping
goes in a fixed order: tell systemd STOPPING, stop accepting new work, let in-flight
operations finish for up to `drain_timeout` (then cancel them: a cancelled restore removes
what it built, a cancelled fill keeps its partial blob for the next run), close the parts,
remove the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import resource
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry

from hostd import __version__, access, leases, maintain
from hostd.api_local import make_app, make_metrics_app
from hostd.api_peer import PeerServer, make_peer_app
from hostd.asuser import Spawner, Storage
from hostd.cache import Cache
from hostd.caller import peer_creds, peer_pidfd, quota_uid
from hostd.config import AccessConfig, Config, PeersConfig, TierConfig, load_config
from hostd.core import peerauth
from hostd.core.budget import Space, choose, iec
from hostd.core.retry import RetryPolicy
from hostd.desk import Board, Desk, NativeDesk, desk_kind
from hostd.errors import ConfigError, HostdError, Stopping
from hostd.fetch import Fetcher
from hostd.fill import Filler
from hostd.guard import Guard, address_of
from hostd.hostfacts import HostFacts, detect_bounded, detect_timeout
from hostd.index import Index
from hostd.leases import Leases
from hostd.lock import CacheLocks
from hostd.materialize import RANGES_THREAD
from hostd.memory import Trimmer, tune_malloc
from hostd.metrics import (
    GuardCollector,
    HostCollector,
    Metrics,
    PeerCollector,
    StateCollector,
)
from hostd.origin import Origin
from hostd.peers import ChunkBuffer, Membership, OriginPull, PeerClient, PeerSource, new_node_id
from hostd.publish import Publisher
from hostd.restore import CANCEL_GRACE, Progress, Resolver, Restorer
from hostd.sources import ChunkSource, LocalBlobSource, OriginSource
from hostd.systemd import Notifier
from hostd.tier import Tier

log = logging.getLogger("hostd")


class Daemon:
    """Every part of one running hostd, built from one Config."""

    def __init__(
        self, config: Config, host: HostFacts, *, registry: CollectorRegistry | None = None
    ) -> None:
        self.config = config
        self.host = host  # detected before: NVML's init blocks (seconds on a big GPU host)
        self.started = time.monotonic()
        self.in_flight = 0
        # The status as the socket's desk answers it off the loop (desk.py): rendered here.
        self.board = Board(self.status, self.started)
        self.operations: set[asyncio.Future[Any]] = set()  # streamed operations running
        # Gives the heap an operation freed back to the system once none runs.
        self.trimmer = Trimmer(lambda: self.in_flight > 0)
        self.accepting = True
        self.metrics_address = ""
        local = connection_caps()[0]
        self.guard = Guard("socket", per_client=min(LOCAL_CONNECTIONS_PER_UID, local), total=local)
        tiers = [Tier(t.name, t.path, t.budget) for t in config.tiers]
        self.index = Index(config.index)
        self.cache = Cache(
            tiers, self.index, manifests_dir=config.index.parent / "manifests", clock=time.time
        )
        self.origin = Origin(
            config.origin,
            config.origin_options,
            concurrency=config.fetch_concurrency + config.upload_concurrency,
            retry=RetryPolicy(config.retries, config.retry_base, config.retry_max),
            timeout=config.request_timeout,
        )
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.peers: Peers | None = None
        if config.peers is not None and (secret := peer_secret(config.peers)) is not None:
            self.peers = Peers(config, self.origin, self.metrics, secret or None)
            sources: list[ChunkSource] = [
                LocalBlobSource(self.cache),
                self.peers.buffer,
                self.peers.source,
                self.peers.pull,
            ]
        else:
            sources = [LocalBlobSource(self.cache), OriginSource(self.origin)]
        self.fetcher = Fetcher(sources, config.fetch_concurrency)
        self.metrics.sources([*(t.name for t in tiers), *(s.name for s in sources), "resumed"])
        self.filler = Filler(
            self.cache,
            self.fetcher,
            workers=config.fetch_concurrency,
            memory=config.fetch_memory,
            fetch_range=config.fetch_range,
        )
        self.cache.busy = self.filler.filling  # partial blobs a fill holds are not evicted
        # Read leases on the blobs linked to callers that cannot write them, where asked
        # ([access] link_checks = "lease"): a break is heard by `leases_broken`.
        self.leases = Leases(lease_budget()) if config.access.link_checks == "lease" else None
        if self.leases is not None:
            self.cache.guard_links(self.leases)
        self._lease_scan: asyncio.Task[None] | None = None
        self._lease_rescan = False  # a break heard since the running scan began
        if self.peers is not None:
            self.peers.serve_from(self.cache, self.filler)
        self.storage = Storage(own_storage(config))
        self.spawner = Spawner()  # helpers that act with a caller's rights
        resolver = Resolver(self.origin, self.cache, config.kinds, host.facts)
        self.restorer = Restorer(
            self.cache,
            self.filler,
            resolver,
            storage=self.storage,
            spawner=self.spawner,
            link_to_writers=config.access.link_to_writers,
            link_checks=config.access.link_checks,
        )
        self.publisher = Publisher(
            self.cache,
            self.origin,
            chunk_size=config.chunk_size,
            compress=config.compress,
            min_saving=config.compress_min_saving,
            upload_concurrency=config.upload_concurrency,
            pack_size=config.pack_size,
            resolver=resolver,
            storage=self.storage,
            spawner=self.spawner,
        )
        self.metrics.registry.register(StateCollector(self.cache, self.fetcher, self.origin, self))
        self.metrics.registry.register(HostCollector(self.host))
        guards = [self.guard]
        if self.peers is not None:
            self.metrics.registry.register(PeerCollector(self.peers.client, self.peers.membership))
            guards.append(self.peers.guard)
        self.metrics.registry.register(GuardCollector(guards))

    def __repr__(self) -> str:
        return f"Daemon({self.config.socket}, in_flight={self.in_flight}, {self.cache!r})"

    def check_accepting(self) -> None:
        if not self.accepting:
            raise Stopping("hostd is stopping; try again once it is back")

    def status(self) -> dict[str, Any]:
        """The status as the loop renders it (desk.Board); each answer appends the uptime,
        the rendering's age and the caller's part (desk.answer, native/desk.c)."""
        return {
            "version": __version__,
            "pid": os.getpid(),
            "socket": str(self.config.socket),
            "metrics_address": self.metrics_address,
            "origin": self.origin.url,
            "index": str(self.config.index),
            "config": str(self.config.source) if self.config.source else None,
            "tiers": [
                {
                    "name": u.name,
                    "path": u.path,
                    "budget": u.budget,
                    "used": u.used,
                    "blobs": u.blobs,
                    "room": u.room,
                }
                for u in self.cache.usage()
            ],
            "in_flight": self.in_flight,
            "snapshots": len(self.cache.snapshots()),
            "peers": self.peers.status() if self.peers is not None else None,
            "host": self.host.to_json(),
        }

    async def list_snapshots(self) -> list[dict[str, Any]]:
        out = []
        for s in sorted(self.cache.snapshots(), key=lambda s: -s.last_used):
            # per blob: in a thread, so a cache of many snapshots does not stall the loop
            per_tier, complete = await asyncio.to_thread(self.cache.presence, s.id)
            out.append(
                {
                    "id": s.id,
                    "refs": self.index.refs_of(s.id),
                    "files": s.files,
                    "bytes": s.bytes,
                    "pinned": s.pinned,
                    "last_used": s.last_used,
                    "tiers": per_tier,
                    "complete": complete,
                    "compat": dict(s.compat),
                }
            )
        return out

    async def gc(self) -> dict[str, Any]:
        self.check_accepting()
        return await maintain.gc(self.cache, busy=self.filler.filling())

    async def verify(self, progress: Progress) -> dict[str, Any]:
        return await maintain.verify(self.cache, progress)

    def choose_budgets(
        self, tiers: Iterable[TierConfig], space: Mapping[str, Space], *, start: bool
    ) -> None:
        """Set each tier's budget from its config, a share capped by the free space of its
        filesystem (core/budget.py), and log it with the reason: every tier at start, a
        change at a reload. Here, not in config.py: the cap counts the bytes a tier already
        holds as free, which only the cache knows once it has scanned the tiers (config.py
        only measures filesystems, and must not depend on the cache); and not in cache.py,
        which enforces budgets but does not choose them."""
        used = {u.name: u.used for u in self.cache.usage()}
        by_name = {t.name: t for t in tiers}
        for t in self.cache.tiers:
            nt = by_name.get(t.name)
            if nt is None or nt.path != t.root or t.name not in space:
                continue
            b = choose(nt.budget_spec, nt.budget, space[t.name], used[t.name])
            if start or b.bytes != t.budget:
                log.info(
                    "tier %s budget %s (%d bytes): %s", t.name, iec(b.bytes), b.bytes, b.reason
                )
                if b.warning is not None:
                    log.warning("tier %s budget %s %s", t.name, iec(b.bytes), b.warning)
            t.budget = b.bytes

    def apply_reload(self, new: Config, space: Mapping[str, Space]) -> None:
        """Apply what can change while running; name what needs a restart. `space`: the
        tiers' filesystems, measured (measure_tiers) for their budgets."""
        old = self.config
        self.choose_budgets(new.tiers, space, start=False)
        logging.getLogger("hostd").setLevel(new.log_level.upper())
        # [access]: who may use what, the caps and link_to_writers apply to the requests
        # after this one (each request reads them from here; the desks with the next
        # rendering): revoking a caller needs no restart. link_checks does (leases or not).
        rights = dataclasses.replace(new.access, link_checks=old.access.link_checks)
        if rights != old.access:
            log.info("config: [access] now %s", _shown_access(rights))
        self.restorer.link_to_writers = rights.link_to_writers
        self.config = dataclasses.replace(old, access=rights, log_level=new.log_level)
        if new.access.link_checks != old.access.link_checks:
            log.warning(
                "config key 'access.link_checks' changed; it takes effect when hostd restarts"
            )
        live = {"tiers", "tiers_default", "log_level", "source", "access"}
        for f in dataclasses.fields(Config):
            if f.name not in live and getattr(old, f.name) != getattr(new, f.name):
                log.warning("config key %r changed; it takes effect when hostd restarts", f.name)
        if [(t.name, t.path) for t in old.tiers] != [(t.name, t.path) for t in new.tiers]:
            log.warning("tier names or paths changed; they take effect when hostd restarts")

    async def drain(self, grace: float) -> None:
        """Let running operations finish for up to `grace` seconds, then cancel the rest: each
        removes what it made, and its stream ends with an error while the client is still
        connected."""
        running = set(self.operations)
        if not running:
            return
        _, late = await asyncio.wait(running, timeout=grace)
        for t in late:
            t.cancel()
        if late:
            log.warning("cancelled %d operation(s) that did not finish in time", len(late))
            await asyncio.wait(late)

    def leases_broken(self) -> None:
        """A read lease broke (someone opened a blob linked out for writing): give up the
        broken ones at once, on a thread (the opener waits until then). Their blobs are
        checked by ctime from now on, and re-hashed before their next use."""
        # A break heard while a scan runs may come after that scan passed its lease: the
        # running scan goes round again, or its opener would wait for lease-break-time.
        self._lease_rescan = True
        if self._lease_scan is None or self._lease_scan.done():
            self._lease_scan = asyncio.ensure_future(self._scan_leases())

    async def _scan_leases(self) -> None:
        assert self.leases is not None
        while self._lease_rescan:
            self._lease_rescan = False
            broken = await asyncio.to_thread(self.leases.scan)
            self.cache.doubt(broken)
            for digest, tier in broken:
                log.warning(
                    "blob %s in tier %s was opened for writing through a link: it is "
                    "re-hashed before its next use",
                    digest.hex(),
                    tier,
                )

    async def close(self) -> None:
        self.trimmer.close()
        if self.leases is not None:
            # (after the work has stopped: no restore links or re-hashes any more)
            await asyncio.to_thread(self.cache.record_leased)
            self.leases.close()
        await asyncio.to_thread(self.publisher.close)
        await asyncio.to_thread(self.spawner.close)
        await self.fetcher.close()
        await self.filler.close()  # records the blobs still waiting for their sync
        if self.peers is not None:
            await self.peers.close()
        await self.origin.close()
        await asyncio.to_thread(self.index.close)  # after the writes it has queued
        await asyncio.to_thread(self.host.close)


def peer_secret(config: PeersConfig) -> bytes | None:
    """The cluster secret from `secret_file`; b"" when peers run unauthenticated by choice;
    None when they stay off (no secret, and unauthenticated not allowed)."""
    if config.secret_file is None:
        return b"" if config.allow_unauthenticated else None
    try:
        with open(config.secret_file, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(64 * 1024)
    except OSError as e:
        why = f"cannot read {config.secret_file}: {e.strerror}"
        raise ConfigError("peers.secret_file", why) from e
    if st.st_mode & 0o004:
        raise ConfigError(
            "peers.secret_file", f"{config.secret_file} is readable by every user; chmod o-r it"
        )
    try:
        return peerauth.load_secret(data, str(config.secret_file))
    except peerauth.AuthError as e:
        raise ConfigError("peers.secret_file", str(e)) from None


class Peers:
    """The peer parts of one daemon: membership, the client, the source the fetcher asks,
    the origin's shared flight with the owner's buffer, and the server."""

    def __init__(
        self, config: Config, origin: Origin, metrics: Metrics, secret: bytes | None
    ) -> None:
        assert config.peers is not None
        self.config = config.peers
        self.node = new_node_id()
        self.client = PeerClient(
            self.node,
            secret,
            self.config.timeout,
            pull_wait=2 * max(self.config.timeout, config.request_timeout),
            observe=metrics.observe_peer,
        )
        self.membership = Membership(
            self.config.static, self.config.dns, self.config.dns_refresh, self.client
        )
        self.buffer = ChunkBuffer(self.config.buffer)
        # The buffer is looked at again inside the flight: a pull for another host may have
        # landed while this host asked its holders (groupcache's re-check inside the load).
        self.source = PeerSource(
            self.membership, self.client, self.config.hedge_after, origin=origin
        )
        self.pull = OriginPull(
            Fetcher([self.buffer, OriginSource(origin, window=0)], config.fetch_concurrency),
            self.buffer,
            self.membership.owns,
            self.source.owner_key,
        )
        self.server: PeerServer | None = None
        self.address = ""
        self._runner: web.AppRunner | None = None
        self._listening: asyncio.Server | None = None
        total = connection_caps()[1]
        self.guard = Guard("peer", per_client=min(PEER_CONNECTIONS_PER_HOST, total), total=total)

    def __repr__(self) -> str:
        return f"Peers({self.address or self.config.listen}, {self.membership!r})"

    def serve_from(self, cache: Cache, filler: Filler) -> None:
        self.server = PeerServer(
            cache,
            filler,
            self.buffer,
            self.pull,
            self.membership,
            self.node,
            self.client.secret,
            self.config.max_uploads,
            self.config.timeout,
            self.client.stats,
            patience=min(self.config.hedge_after / 2, self.config.timeout / 2),
        )

    async def start(self) -> None:
        assert self.server is not None
        self._runner = web.AppRunner(
            make_peer_app(self.server),
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=PEER_KEEPALIVE,
        )
        await self._runner.setup()
        assert self._runner.server is not None
        host, _, port = self.config.listen.rpartition(":")
        try:
            # (not web.TCPSite: its protocols are aiohttp's alone, with no guard in front)
            self._listening = await asyncio.get_running_loop().create_server(
                self.guard.wrap(self._runner.server, address_of),
                host.strip("[]") or None,
                int(port),
                reuse_address=True,
            )
        except OSError as e:
            raise HostdError(f"peers.listen {self.config.listen}: {e.strerror or e}") from e
        addr = self._listening.sockets[0].getsockname()
        self.membership.port = int(addr[1])
        self.address = f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
        if self.client.secret:
            log.info(
                "peers on %s (node %s), authenticated by %s",
                self.address,
                self.node,
                self.config.secret_file,
            )
        else:
            log.warning(
                "peers on %s run WITHOUT authentication (allow_unauthenticated = true): "
                "anyone who can reach the port can read cached chunks",
                self.address,
            )

    def rekey(self, secret: bytes) -> bool:
        """Take a new cluster secret (its key file rewritten, at a reload): the requests from
        now on are signed and checked with it, and the old one is refused. Whether it
        changed. Peers running unauthenticated stay so (that is a restart's to change)."""
        if not self.client.secret or not secret or secret == self.client.secret:
            return False
        self.client.secret = secret
        if self.server is not None:
            self.server.secret = secret
        self.membership.rekeyed()
        return True

    async def stop(self) -> None:
        if self._listening is not None:
            self._listening.close()  # no new connections; the runner ends the open ones
        if self._runner is not None:
            await self._runner.cleanup()

    async def close(self) -> None:
        await self.pull.fetcher.close()
        await self.client.close()
        if self.server is not None:
            await asyncio.to_thread(self.server.close)

    def status(self) -> dict[str, Any]:
        return {
            "listen": self.address or self.config.listen,
            "node": self.node,
            "self": self.membership.roster.self_name,
            "auth": "hmac" if self.client.secret else "none",
            "members": self.membership.to_json(),
            "buffer": {"used": self.buffer.used, "capacity": self.buffer.capacity},
            "uploading": self.server.uploads.uploading if self.server is not None else 0,
        }


def own_storage(config: Config) -> list[tuple[str, Path]]:
    """hostd's own directories, which no restore or publish may touch."""
    out = [(f"tier {t.name!r}", t.path) for t in config.tiers]
    out.append(("index directory", config.index.parent))
    if config.origin.startswith("file://"):
        out.append(("origin", Path(os.path.normpath(unquote(urlsplit(config.origin).path)))))
    return out


def listen_unix(path: Path, mode: int) -> socket.socket:
    """The socket's listener, bound at `path` with `mode` (claim_socket went first)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


LISTEN_BACKLOG = 128  # aiohttp's and asyncio's

# Connections open at once (hostd/guard.py). On the socket: per uid, root and the daemon's own
# uid uncapped (16 operations a uid by default, and status requests beside them); in all, each
# an idle aiohttp connection of ~10-20 KiB.
LOCAL_CONNECTIONS_PER_UID = 256
LOCAL_CONNECTIONS = 4096
# On the peer port: per address (guard.address_of), twice the most fetch_concurrency
# a peer may fetch with; in all, a fleet of 2,000 hosts each fetching 16 chunks of us at once.
PEER_CONNECTIONS_PER_HOST = 2048
PEER_CONNECTIONS = 32768
PEER_KEEPALIVE = 60.0  # idle seconds before a kept-alive peer connection is closed (aiohttp: 3630)


def connection_caps() -> tuple[int, int]:
    """The socket's and the peer port's totals (LOCAL_CONNECTIONS, PEER_CONNECTIONS), within
    an eighth and a quarter of the open files this process may have: a flood that reaches
    the limit (EMFILE) stops every accept and every file a restore opens."""
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if files == resource.RLIM_INFINITY:
        return LOCAL_CONNECTIONS, PEER_CONNECTIONS
    return min(LOCAL_CONNECTIONS, max(16, files // 8)), min(PEER_CONNECTIONS, max(16, files // 4))


# Descriptors kept for the daemon's own work beside its connections and leases: a restore's
# blobs handed to its helper, tier and index files, origin connections.
WORK_FILES = 2048


def lease_budget() -> int:
    """The read leases the daemon may hold (a descriptor each): what the open files it may
    have leave after both connection caps and WORK_FILES, and never under a quarter of
    them (leases.MOST at most)."""
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if files == resource.RLIM_INFINITY:
        return leases.MOST
    local, peer = connection_caps()
    return min(leases.MOST, max(files // 4, files - local - peer - WORK_FILES))


def local_client(transport: asyncio.BaseTransport) -> int | None:
    """A socket connection's key for its caps: the uid that connected (SO_PEERCRED), or the
    user whose rootless container it runs in (`quota_uid`); None (uncapped) for root and the
    daemon's own uid."""
    sock = transport.get_extra_info("socket")
    pid, uid, _ = peer_creds(sock)
    euid = os.geteuid()
    if uid in (0, euid):
        return None
    pidfd = peer_pidfd(sock)
    try:
        return quota_uid(pid, uid, euid, pidfd)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def claim_socket(path: Path) -> None:
    """Make the socket's directory (private when we create it) and clear a stale socket."""
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.stat(parent)
    if st.st_uid != os.geteuid() and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise HostdError(f"socket directory {parent} is writable by other users; refusing it")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise HostdError(f"socket path {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            os.unlink(path)  # nobody answers: a socket left by a daemon that died
            return
    raise HostdError(f"another hostd is already serving on {path}")


async def serve(
    config: Config,
    *,
    shutdown: asyncio.Event,
    reload: asyncio.Event | None = None,
    notifier: Notifier | None = None,
    registry: CollectorRegistry | None = None,
) -> None:
    """Run one daemon until `shutdown` is set.

    Start-up order: lock every tier and the index's directory, claim the socket, and only then
    open the index and load the cache (which sweeps the tiers' tmp/). A second daemon on the
    same cache, under any path spelling or socket, so stops at the first step having changed
    nothing. The locks go last, after the socket is removed."""
    if config.tiers_default:
        log.log(
            logging.WARNING if config.source else logging.INFO,
            "no [[tiers]] in the config: using the per-user default tiers %s "
            "(locked: no other daemon may use them while this one runs)",
            ", ".join(f"{t.name}={t.path}" for t in config.tiers),
        )
    places = [(f"tier {t.name!r}", t.path) for t in config.tiers]
    locks = await asyncio.to_thread(
        CacheLocks.take, [*places, ("index", config.index.parent)], config.socket
    )
    try:
        await _serve_locked(config, shutdown, reload, notifier or Notifier(None), registry)
    finally:
        locks.release()


async def _serve_locked(
    config: Config,
    shutdown: asyncio.Event,
    reload: asyncio.Event | None,
    notifier: Notifier,
    registry: CollectorRegistry | None,
) -> None:
    claim_socket(config.socket)
    # Never raises: without NVML, its facts say why. Bounded: NVML may hang, so detect() runs
    # on a daemon thread of its own that nobody joins, and this executor thread returns after
    # HOSTD_NVML_TIMEOUT seconds at most.
    facts = await asyncio.to_thread(detect_bounded, detect_timeout(os.environ))
    try:
        d = Daemon(config, facts, registry=registry)  # opens the index
    except BaseException:
        facts.close()
        raise
    if d.leases is not None:
        asyncio.get_running_loop().add_signal_handler(leases.SIGNAL, d.leases_broken)
    try:
        try:
            await asyncio.to_thread(d.spawner.prestart)  # (it starts while the cache loads)
        except HostdError as e:
            log.warning("%s; trying again at the first publish or restore", e)
        await asyncio.to_thread(d.cache.load)
        # After the load: the bytes a tier holds count as free space for its budget.
        space = await asyncio.to_thread(measure_tiers, d.cache.tiers)
        d.choose_budgets(config.tiers, space, start=True)
        await d.cache.enforce_budgets()  # a cap below what a tier holds evicts down to it
    except BaseException:
        await d.close()
        raise
    gc.freeze()  # the loaded cache view lives as long as the daemon: never walked again
    runner = web.AppRunner(
        make_app(d, config.max_request_body),
        handler_cancellation=True,
        shutdown_timeout=config.drain_timeout,
        keepalive_timeout=config.idle_timeout,
        access_log=None,
    )
    metrics_runner = web.AppRunner(make_metrics_app(d), access_log=None, handler_cancellation=True)
    desk: Desk | NativeDesk | None = None
    try:
        await runner.setup()
        if config.metrics_address:
            host, _, port = config.metrics_address.rpartition(":")
            await metrics_runner.setup()
            try:
                await web.TCPSite(metrics_runner, host.strip("[]") or None, int(port)).start()
            except OSError as e:
                # (a port another exporter holds, an address not on this host: a message
                # naming the key, not a traceback)
                raise HostdError(
                    f"metrics_address {config.metrics_address}: cannot listen there: "
                    f'{e.strerror or e}; pick a free port (0: any), or "" to turn metrics off'
                ) from e
            addr = metrics_runner.addresses[0]
            d.metrics_address = (
                f"{addr[0]}:{addr[1]}" if ":" not in addr[0] else f"[{addr[0]}]:{addr[1]}"
            )
        assert runner.server is not None
        # The peer port before the socket: a daemon that answers its socket answers peers
        # (and one whose peer port is taken never answered anyone).
        if d.peers is not None:
            await d.peers.start()
        d.board.refresh()
        desk = desk_kind()(
            listen_unix(config.socket, config.socket_mode),
            d.board,
            lambda: d.config.access,
            os.geteuid(),
            d.guard.wrap(runner.server, local_client),
            d.guard.wrap(runner.server, local_client, deadline=False),
        )
        desk.start()
        log.info(
            "hostd %s serving on %s; metrics on %s; origin %s; index %s; tiers %s",
            __version__,
            config.socket,
            d.metrics_address or "off",
            d.origin.url,
            config.index,
            ", ".join(f"{t.name}={t.root} ({t.budget} bytes)" for t in d.cache.tiers),
        )
        if config.peers is not None and d.peers is None:
            log.warning(
                "peers are OFF: [peers] has no secret_file, and allow_unauthenticated is not "
                "true; set one of them to share chunks with other hosts"
            )
        notifier.ready(f"serving on {config.socket}")
        # The start's load was an operation too: reading a million index rows leaves ~40 MiB
        # of freed heap that nothing gives back until the first restore or publish ends.
        d.trimmer.ended()
        async with asyncio.TaskGroup() as tg:
            helpers = []
            if d.peers is not None:
                helpers.append(tg.create_task(d.peers.membership.run()))
            if notifier.watchdog_interval:
                helpers.append(tg.create_task(_watchdog(notifier, notifier.watchdog_interval)))
            if reload is not None:
                helpers.append(tg.create_task(_reloader(d, reload, notifier)))
            await shutdown.wait()
            for t in helpers:
                t.cancel()
        log.info(
            "stopping: draining %d operation(s) for up to %ss", d.in_flight, config.drain_timeout
        )
        notifier.stopping("draining in-flight work")
        # systemd's stop timeout (the unit's TimeoutStopSec) must not fire first: its SIGKILL
        # would leave a process that a caller's stuck filesystem holds (below) with the
        # cache's locks, socket and ports, and no daemon could start on that cache.
        notifier.extend_timeout(config.drain_timeout + AFTER_DRAIN)
        d.accepting = False
        await d.drain(config.drain_timeout)
        notifier.extend_timeout(AFTER_DRAIN)
    finally:
        if desk is not None:
            await desk.stop()
        if d.peers is not None:
            await d.peers.stop()
        await runner.cleanup()
        await metrics_runner.cleanup()
        await d.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.socket)
        log.info("stopped")


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def measure_tiers(tiers: Iterable[Tier]) -> dict[str, Space]:
    """Each tier's filesystem, by statvfs (blocking: call it in a thread). A tier that cannot
    be measured keeps the budget its config resolved to."""
    out: dict[str, Space] = {}
    for t in tiers:
        try:
            st = os.statvfs(t.root)
        except OSError as e:
            log.warning("tier %s: cannot measure the filesystem of %s: %s", t.name, t.root, e)
            continue
        out[t.name] = Space(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)
    return out


def _shown_access(a: AccessConfig) -> str:
    lists = " ".join(f"{c}={','.join(getattr(a, c)) or '-'}" for c in access.CLASSES)
    return (
        f"{lists} max_operations={a.max_operations} "
        f"max_operations_per_uid={a.max_operations_per_uid} "
        f"link_to_writers={str(a.link_to_writers).lower()}"
    )


async def _reloader(d: Daemon, reload: asyncio.Event, notifier: Notifier) -> None:
    while True:
        await reload.wait()
        reload.clear()
        notifier.reloading()
        try:
            new = await asyncio.to_thread(load_config, d.config.source)
        except ConfigError as e:
            log.error("reload refused, keeping the running config: %s", e.message)
        else:
            d.apply_reload(new, await asyncio.to_thread(measure_tiers, d.cache.tiers))
            await _reload_secret(d, new)
            d.board.refresh()  # the desk's [access] lists, at once
            await d.cache.enforce_budgets()
            d.board.refresh()  # new budgets show in the next status
            log.info("config reloaded from %s", d.config.source or "embedded defaults")
        notifier.ready(f"serving on {d.config.socket}")


async def _reload_secret(d: Daemon, new: Config) -> None:
    """Read the cluster secret's key file again, where the peers' config names the same one:
    a secret rotated (a leaked one revoked) takes effect at the reload, as `[access]` does,
    not silently at the next restart. A key file that cannot be used keeps the running one."""
    if d.peers is None or new.peers is None or new.peers.secret_file is None:
        return
    if new.peers.secret_file != d.peers.config.secret_file:
        return  # logged by apply_reload as a key that needs a restart
    try:
        secret = await asyncio.to_thread(peer_secret, new.peers)
    except ConfigError as e:
        log.error("reload: keeping the running cluster secret: %s", e.message)
        return
    if secret is not None and d.peers.rekey(secret):
        log.warning(
            "peers: the cluster secret changed (%s): requests are signed and checked with "
            "the new one from now on; hosts still holding the old one are refused until "
            "they reload too",
            new.peers.secret_file,
        )


class _Logfmt(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return (
            f"ts={ts}Z level={record.levelname.lower()} logger={record.name} msg={json.dumps(msg)}"
        )


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json() if fmt == "json" else _Logfmt())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("hostd").setLevel(level.upper())


def main(config_path: Path | None) -> int:
    """`hostd serve`: run in the foreground until SIGTERM or SIGINT."""
    try:
        config = load_config(config_path)
    except ConfigError as e:
        print(f"hostd: {e.message}", file=sys.stderr)
        return e.exit_code  # 2 for a bad value; 1 for a file that cannot be read
    setup_logging(config.log_level, config.log_format)
    _raise_open_files_limit()
    _drop_resource_override()
    _tune_interpreter()
    import uvloop

    try:
        uvloop.run(_main(config))
    except ConfigError as e:
        # A bad config value found only while building the parts (origin_options) is still
        # a usage error: said and exited as one found while loading the file (2).
        print(f"hostd: {e.message}", file=sys.stderr)
        return 2
    except HostdError as e:
        # Anything else: the log's last line, once (a log pipeline parses it as the rest;
        # a second, plain copy would be one more line to tell apart).
        log.error("%s", e.message)
        return 1
    _leave_stuck_threads()
    return 0


# Seconds the threads still running after the daemon's own shutdown get to end.
THREADS_GRACE = 5.0
# Seconds a stop may take past its drain: the operations cancelled then stop (a restore's
# thread gets 2 x CANCEL_GRACE), the daemon closes, its threads get THREADS_GRACE; with room
# for a loaded machine. Asked of systemd as the stop begins (EXTEND_TIMEOUT_USEC).
AFTER_DRAIN = 2 * CANCEL_GRACE + THREADS_GRACE + 20.0


def _leave_stuck_threads() -> None:
    """Exit now if a thread outlives the shutdown by THREADS_GRACE: one stuck in a caller's
    filesystem (a write a FUSE server never answers) would hold the interpreter's exit,
    which joins every pool thread, for as long as that server likes; the daemon's own work
    (index, tiers) is closed by now.

    Such a thread holds the process itself too: the kernel waits out a FUSE request its
    server has read, SIGKILL or not, and the process's descriptors stay open until its last
    thread ends. So every descriptor is closed first: the tiers' and the index's locks, the
    socket and the metrics port go now, and a daemon started meanwhile takes them over."""

    def waited_for(t: threading.Thread) -> bool:
        return t is not threading.current_thread() and (not t.daemon or t.name == RANGES_THREAD)

    deadline = time.monotonic() + THREADS_GRACE
    for t in threading.enumerate():
        if waited_for(t):
            t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if waited_for(t)]
    if stuck:
        log.warning("exiting past %d stuck thread(s): %s", len(stuck), ", ".join(stuck[:8]))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os._exit(0)


# The cyclic garbage collector's youngest generation is collected after this many new
# container objects (Python's default: 700). A restore makes about ten per file; at the
# default, a restore of 10,000 files ran ~300 collections, one in ten of them a full one
# that walks the whole heap (every blob record and decoded manifest): 40-90 ms of event loop
# each, which every status request and peer caught behind them waited out. What hostd keeps
# is acyclic (records, tuples, dicts), so little is garbage only a collector finds.
GC_YOUNG = 10_000


# How long a thread running Python may keep the GIL while another waits for it (Python's
# default: 5 ms). The event loop shares the interpreter with the threads that materialize,
# ingest and write: at 5 ms, a status request that came in while one of them ran waited up
# to 5 ms for each turn of the loop it needed.
SWITCH_INTERVAL = 0.001


def _tune_interpreter() -> None:
    """Collect rarely (GC_YOUNG) and hand the GIL over sooner (SWITCH_INTERVAL). What
    start-up makes is frozen out of every collection once the cache is loaded. Reuse freed
    buffers, in a few arenas (memory.tune_malloc)."""
    gc.set_threshold(GC_YOUNG, 50, 100)
    sys.setswitchinterval(SWITCH_INTERVAL)
    if not tune_malloc():
        log.debug("memory: malloc's thresholds and arenas left as they are")


def _drop_resource_override() -> None:
    """Give up CAP_SYS_RESOURCE, before any thread starts: the daemon writes into callers'
    files (a progressive restore's ranges), and with it those writes would take the
    filesystem's blocks reserved for root and pass the caller's quota, where the helper's
    own copies, as the caller, fail with ENOSPC or EDQUOT. The unit's bounding set leaves it
    out already; a daemon run as root elsewhere drops it here. Nothing of hostd's needs it
    (the open files limit is only raised to the hard one)."""
    from hostd.fsops import CAP_SYS_RESOURCE, drop_capability

    if drop_capability(CAP_SYS_RESOURCE):
        log.debug("dropped CAP_SYS_RESOURCE")


def _raise_open_files_limit() -> None:
    """Take the hard limit on open files as the soft one: a restore of small files hands the
    helper hundreds of blob descriptors at once, and a shell's soft limit is often 1024
    (the unit sets LimitNOFILE itself)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _main(config: Config) -> None:
    loop = asyncio.get_running_loop()
    shutdown, reload = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, shutdown.set)
    loop.add_signal_handler(signal.SIGINT, shutdown.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    await serve(config, shutdown=shutdown, reload=reload, notifier=Notifier.from_env())
