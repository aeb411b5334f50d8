"""Restore and prefetch: ref -> snapshot id -> manifest -> complete blobs -> target tree.

Resolution asks the origin for the ref under the compat keys this host fits, most specific
first, and remembers each answer in the index so a restore of a cached snapshot still works
while the origin is down. Bytes move in fill.py; files are made in materialize.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import shlex
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostd.asuser import AsUser, Ledger, Spawner, Storage
from hostd.cache import Blob, Cache
from hostd.caller import Caller, could_write_cache
from hostd.core import compat
from hostd.core import manifest as mf
from hostd.core.ids import compat_digest, is_hex_id
from hostd.core.pathfilter import load_order, order_work
from hostd.errors import (
    BlobMoved,
    Forbidden,
    HostdError,
    ManifestError,
    NotFound,
    OriginError,
    TargetError,
    UsageError,
    unheard,
)
from hostd.fill import Filler, FillProgress
from hostd.materialize import Cancelled, Outcome, Placer, Ready, State, Watch, materialize, may_link
from hostd.origin import Origin, RetryNote, validate_ref
from hostd.snapshots import decode_manifest
from hostd.tier import Tier, blob_mode

log = logging.getLogger(__name__)
CANCEL_GRACE = 10.0  # seconds a cancelled materialize gets to remove what it built
# Blobs a restore marks used between turns of the loop.
TOUCH_BATCH = 4096
RANGED_FILES = 256  # a progressive restore's files written by range at most (a descriptor each)
LEND_BATCH = 1024  # lent marks: a row each
LOOKUP_PARALLEL = 8  # ref reads a resolve makes at once
# Times a restore builds its hidden tree again after a copy of a lent blob that moved while
# it was made did not hash right read back (errors.BlobMoved: a write through a link).
REBUILDS = 2
MISS_SHOWN = 3  # published fact sets a miss lists
# A load order's work (pathfilter.order_work: pattern characters x paths) done on the loop;
# more goes to a thread, and past ORDER_WORK the request is refused: patterns built to be
# slow (`?*?*...`) cost ~65 ns a unit, so ~3 s of a core at most; ten patterns of 50
# characters over 100,000 files is within it.
ORDER_INLINE = 50_000
ORDER_WORK = 50_000_000


@dataclass
class TakeBack:
    """What a progressive restore placed, kept once it has ended well until its result has
    gone to the caller: should the caller go first (a loader that failed on a shard and
    stopped the call), the stream takes the tree back, as a failure would have. A helper
    for the caller, in the caller's root as the restore's helper opened it, removes what the
    ledger and the daemon's links name (AsUser.reclaim)."""

    caller: Caller
    spawner: Spawner
    root_fd: int  # owned: close()
    ledger: Ledger
    placer: Placer  # its links_made()

    def run(self) -> None:
        """Take the tree back (blocking), then close(); a failure is logged."""
        try:
            fs = AsUser.start(self.caller, self.spawner, root_fd=self.root_fd)
            try:
                fs.reclaim(self.ledger, self.placer.links_made())
            finally:
                fs.close()
        except (HostdError, OSError) as e:
            log.warning("could not take back the restore into %s: %s", self.ledger.path, e)
        finally:
            self.close()

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1


@dataclass
class Progress:
    """What a running operation has done so far; the API samples it for progress events.

    `admitted` turns true once the request's own checks are past (the ref resolved, the
    source scanned): a failure before that is answered with its own HTTP status, one after
    it as an `error` event. `retry` is the origin's retry under way, if any (`on_retry`);
    `warnings` only grows, and each one goes out once as a `warning` event."""

    phase: str = "resolve"
    fill: FillProgress = field(default_factory=FillProgress)
    total_files: int = 0
    done_files: int = 0
    admitted: bool = False
    retry: dict[str, Any] | None = None
    warnings: list[dict[str, Any]] = field(default_factory=list)
    # A progressive restore's `file` events not sent yet, and a wake-up for the stream.
    files: collections.deque[dict[str, Any]] = field(default_factory=collections.deque)
    news: asyncio.Event = field(default_factory=asyncio.Event)
    placed_bytes: int = 0
    files_bytes: int = 0  # the bytes of every file: a `file` event's total_bytes
    take_back: TakeBack | None = None  # a progressive restore's, until its result is sent

    def placed(self, files: Sequence[mf.FileEntry]) -> None:
        """Files that landed in a progressive restore's target, in order (on the loop)."""
        for f in files:
            self.done_files += 1
            self.placed_bytes += f.size
            self._file_event(f.path, f.size)
        self.news.set()

    def ranged(self, ranges: Sequence[tuple[str, str, int, int, int]]) -> None:
        """Verified bytes written into files of a progressive restore with `ranges`, before
        they land: (path, scratch name, offset, length, the file's size) each, a `range`
        event each."""
        for path, part, offset, length, size in ranges:
            self.files.append(
                {
                    "event": "range",
                    "path": path,
                    "part": part,
                    "offset": offset,
                    "length": length,
                    "size": size,
                }
            )
        self.news.set()

    def symlinked(self, links: Sequence[mf.Symlink]) -> None:
        """A progressive restore's symlinks, made last: a `file` event each, with its
        `symlink` target (the file counts are of regular files, unchanged)."""
        for s in links:
            self._file_event(s.path, 0, symlink=s.target)
        self.news.set()

    def _file_event(self, path: str, size: int, **extra: str) -> None:
        self.files.append(
            {
                "event": "file",
                "path": path,
                "size": size,
                **extra,
                "done_files": self.done_files,
                "total_files": self.total_files,
                "done_bytes": self.placed_bytes,
                "total_bytes": self.files_bytes,
            }
        )

    def on_retry(self, note: RetryNote | None) -> None:
        """The origin's report: a failed request it retries after a delay, or None once one
        that was retried got its answer."""
        self.retry = None if note is None else note.to_json()

    def event(self) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "event": "progress",
            "phase": self.phase,
            "done_bytes": self.fill.done_bytes,
            "total_bytes": self.fill.total_bytes,
            "done_files": self.done_files,
            "total_files": self.total_files,
        }
        if self.retry is not None:
            ev["retry"] = self.retry
        return ev


class NoSnapshotFits(NotFound):
    """The ref exists, under compat facts this host does not fit. The answer also lists the
    nearest published fact sets and what differs in each (`nearest`), for scripts."""

    def __init__(self, message: str, nearest: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.nearest = nearest

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "nearest": self.nearest}


@dataclass(frozen=True)
class Resolved:
    snapshot_id: str
    manifest: mf.Manifest
    stale: bool  # answered from the local record because the origin was unreachable


class Resolver:
    """Refs to snapshots for this host: `kinds` names each snapshot kind's compat facts,
    `known` the facts this host tells itself (hostfacts.py; compat.basic_facts without)."""

    def __init__(
        self,
        origin: Origin,
        cache: Cache,
        kinds: compat.Kinds,
        known: Mapping[str, str] | None = None,
    ) -> None:
        self.origin = origin
        self.cache = cache
        self.kinds = {k: tuple(v) for k, v in kinds.items()}
        self.known = dict(compat.basic_facts() if known is None else known)

    def __repr__(self) -> str:
        return f"Resolver({self.origin.url}, kinds={self.kinds})"

    def host(self, given: Mapping[str, str]) -> dict[str, str]:
        """This host's facts for a restore: every fact a kind names, and the client's."""
        names = {n for names in self.kinds.values() for n in names} | set(self.known)
        return compat.host_facts(sorted(names), given, self.known)

    async def resolve(self, ref: str, given: Mapping[str, str]) -> Resolved:
        """A ref (or a snapshot id) to its manifest for this host's compat facts."""
        if is_hex_id(ref):
            return Resolved(ref, await self.manifest(ref), False)
        validate_ref(ref)
        host = self.host(given)
        digests = [compat_digest(facts) for facts in compat.lookup_digests(self.kinds, given, host)]
        try:
            sid = await self._lookup(ref, digests, host, given)
        except OriginError as e:
            for d in digests:
                local = self.cache.index.get_ref(ref, d)
                if local is not None and self.cache.snapshot(local) is not None:
                    log.warning(
                        "origin unreachable; using the last known %s -> %s: %s", ref, local, e
                    )
                    return Resolved(local, await self.manifest(local), True)
            raise
        return Resolved(sid, await self._manifest_of(ref, sid), False)

    async def _manifest_of(self, ref: str, sid: str) -> mf.Manifest:
        """The manifest a ref names: one that is not at the origin is a broken origin (a
        partial copy, a manifest removed by hand), not an unknown ref: exit 1, not the 3
        that tells a caller to publish one."""
        try:
            return await self.manifest(sid)
        except NotFound as e:
            raise ManifestError(
                f"ref {ref!r} names snapshot {sid}, but {e.message}: the origin lacks an "
                "object it should hold"
            ) from e

    async def _lookup(
        self, ref: str, digests: Sequence[str], host: Mapping[str, str], given: Mapping[str, str]
    ) -> str:
        # The most specific key first, on its own: a listing that lags a new ref (an
        # eventually consistent one) cannot hide it, and an origin that does not answer is
        # retried for one request, not for several. Then one listing of the ref's keys
        # where the origin can list, and only the keys that exist are read, most specific
        # first; where it cannot (plain HTTP), every other key at once.
        first = await self.origin.get_ref(ref, digests[0])
        if first is not None:
            return self._remember(ref, digests[0], first)
        listed = await self.origin.list_ref(ref)
        if listed is None:
            for d, sid in zip(digests, await self._read_keys(ref, digests), strict=True):
                if sid is not None:
                    return self._remember(ref, d, sid)
        else:
            present = set(listed)
            for d in digests:
                sid = await self.origin.get_ref(ref, d) if d in present else None
                if sid is not None:
                    return self._remember(ref, d, sid)
        # Published under another set of facts: among the ref's other keys, pick the snapshot
        # that names the most facts, all of which this host has.
        best: tuple[int, str, str] | None = None
        near: list[tuple[list[str], str, Mapping[str, str]]] = []
        for d in listed or []:
            if d in digests:
                continue
            sid = await self.origin.get_ref(ref, d)
            if sid is None:
                continue
            m = await self._manifest_of(ref, sid)
            differ = compat.differences(m.compat, host)
            if not differ and (best is None or len(m.compat) > best[0]):
                best = (len(m.compat), sid, d)
            near.append((differ, sid, m.compat))
        if best is not None:
            return self._remember(ref, best[2], best[1])
        if listed:
            raise self._miss(ref, host, given, near)
        if listed is None:  # an origin that cannot list: another fact set may hold it
            raise NotFound(
                f"ref {ref!r} not found at origin {self.origin.url} under this host's compat "
                f"facts ({_shown(host)}); the origin cannot list, so other fact sets it may "
                "be published under are not known"
            )
        raise NotFound(f"no such ref {ref!r} at origin {self.origin.url}")

    def _remember(self, ref: str, digest: str, sid: str) -> str:
        """The answer for `ref` under `digest`, kept for when the origin is down."""
        self.cache.index.put_ref(ref, digest, sid, time.time())
        return sid

    async def _read_keys(self, ref: str, digests: Sequence[str]) -> list[str | None]:
        """Each key's snapshot id (the first is known to be missing), where the origin cannot
        list: all at once, one round trip rather than one per key."""
        sem = asyncio.Semaphore(LOOKUP_PARALLEL)

        async def get(d: str) -> str | None:
            async with sem:
                return await self.origin.get_ref(ref, d)

        return [None, *await asyncio.gather(*map(get, digests[1:]))]

    def _miss(
        self,
        ref: str,
        host: Mapping[str, str],
        given: Mapping[str, str],
        near: list[tuple[list[str], str, Mapping[str, str]]],
    ) -> NoSnapshotFits:
        """Why no snapshot of `ref` fits this host: for the nearest published fact sets, which
        facts differ, and how to publish one that fits. One line, as every CLI error."""
        near.sort(key=lambda n: (len(n[0]), n[1]))
        shown = []
        nearest = []
        for differ, sid, facts in near[:MISS_SHOWN]:
            kind = compat.kind_of(facts, self.kinds)
            said = ", ".join(
                f"{k}: published {facts[k]}, this host {host.get(k, compat.UNKNOWN)}"
                for k in differ
            )
            shown.append(f"{sid[:12]} ({kind or 'own facts'}) {said}")
            nearest.append(
                {
                    "snapshot": sid,
                    "kind": kind,
                    "differ": {
                        k: {"published": facts[k], "host": host.get(k, compat.UNKNOWN)}
                        for k in differ
                    },
                }
            )
        more = f"; and {len(near) - MISS_SHOWN} more" if len(near) > MISS_SHOWN else ""
        facts = near[0][2] if near else {}
        kind = compat.kind_of(facts, self.kinds) or compat.DEFAULT_KIND
        # the facts beyond the kind's: the client gives them (this host's value where it
        # knows one, as `hostd publish` would not add it)
        own = sorted(set(facts) - set(self.kinds[kind]) - {"format"})
        hint = "".join(f" --compat {k}={shlex.quote(_value_for(k, given, host))}" for k in own)
        published = (
            f"Nearest published: {'; '.join(shown)}{more}."
            if shown
            else "Its other keys were removed while they were listed."
        )
        return NoSnapshotFits(
            f"ref {ref!r} has no snapshot for this host. {published} Boot from scratch, then "
            f"publish one for this host: hostd publish DIR --ref {ref} --kind {kind}{hint}",
            nearest,
        )

    async def manifest(self, snapshot_id: str) -> mf.Manifest:
        local = await self.cache.load_manifest(snapshot_id)
        if local is not None:
            return local
        data = await self.origin.get_manifest(snapshot_id)
        decode = functools.partial(decode_manifest, data, keep_bytes=True, expect_id=snapshot_id)
        try:
            return await asyncio.to_thread(decode)
        except ManifestError as e:  # name the manifest: decode only knows its bytes
            raise ManifestError(
                f"manifest {snapshot_id} at origin {self.origin.url}: {e.message}"
            ) from e


@dataclass(frozen=True)
class RestoreRequest:
    ref: str
    target: Path
    caller: Caller  # whose rights build the tree, in whose mount namespace
    mode: str = "auto"
    replace: bool = False
    compat: Mapping[str, str] = field(default_factory=dict)
    tier: str | None = None
    pidfd: int = -1  # the caller's process, from the connection (SO_PEERPIDFD); not owned
    progressive: bool = False  # each file lands as soon as its blob is ready (Placer)
    keep_partial: bool = False  # progressive: a failure keeps what was placed
    order: Sequence[str] = ()  # progressive: paths or globs, the load order (fetch priority)
    ranges: bool = False  # progressive: files of several chunks written, and told, by range


class Restorer:
    def __init__(
        self,
        cache: Cache,
        filler: Filler,
        resolver: Resolver,
        *,
        storage: Storage,
        spawner: Spawner,
        link_to_writers: bool,
        link_checks: str = "lease",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.filler = filler
        self.resolver = resolver
        self.storage = storage
        self.spawner = spawner
        self.link_to_writers = link_to_writers
        # [access] link_checks: "all", every blob a restore links is lent, not only those
        # linked to callers that could write them; "lease", those others are held by read
        # leases (hostd/leases.py) before they are linked (the cache's `leases` set)
        self.lend_all = link_checks == "all"
        self.clock = clock

    def __repr__(self) -> str:
        return f"Restorer({self.resolver!r})"

    def _tiers(self, name: str | None) -> Sequence[Tier]:
        return self.cache.tiers if name is None else [self.cache.tier(name)]

    async def _resolve(
        self, ref: str, given: Mapping[str, str], progress: Progress
    ) -> tuple[Resolved, float, float]:
        """The snapshot `ref` names for this host, recorded; with the times before and after."""
        t0 = self.clock()
        res = await self.resolver.resolve(ref, given)
        m = res.manifest
        self.cache.record_snapshot(m)
        t1 = self.clock()
        progress.phase, progress.total_files = "fetch", len(m.files)
        progress.admitted = True  # resolved: what fails from here is an `error` event
        return res, t0, t1

    @contextlib.asynccontextmanager
    async def _filled(
        self, res: Resolved, tiers: Sequence[Tier], progress: Progress, t0: float, t1: float
    ) -> AsyncIterator[_Filled]:
        """Make every blob of `res` complete in one of `tiers`; the blobs stay held while
        the body runs."""
        m = res.manifest
        blobs = m.blobs()
        with self.cache.holding(blobs):
            # every file: of those sharing a blob, the fill picks the mtime most of them have
            where = await self.filler.ensure(m.files, m.chunk_size, tiers, progress.fill)
            now = self.cache.clock()
            yield _Filled(res, where, t0, t1, self.clock())
            # One use, marked after the body, still held: the index writes it queues would
            # otherwise hold the GIL while the tree is built.
            await self._touch(blobs, now)

    async def _cold(self, m: mf.Manifest, tiers: Sequence[Tier]) -> bool:
        """Whether some blob of `m` has no complete copy in `tiers` (stops at the first),
        with turns of the loop between batches (a warm tree of 100,000 files is looked up
        whole)."""
        blobs = list(m.blobs())
        for i in range(0, len(blobs), TOUCH_BATCH):
            if self.cache.missing(blobs[i : i + TOUCH_BATCH], tiers):
                return True
            await asyncio.sleep(0)
        return False

    async def restore(self, req: RestoreRequest, progress: Progress) -> dict[str, Any]:
        if req.progressive and req.replace:
            raise UsageError(
                "field 'progressive': a progressive restore cannot replace a tree (the old one "
                "cannot stay whole while the new one arrives in its place); restore into a new "
                "directory, or drop replace"
            )
        if req.ranges and req.mode == "link":
            raise UsageError(
                "field 'ranges': a file written a range at a time is a copy, and mode 'link' "
                "makes none; use mode auto or copy"
            )
        writer = await asyncio.to_thread(could_write_cache, req.caller, os.geteuid(), req.pidfd)
        link_ok = self.link_to_writers or not writer
        if req.mode == "link" and not link_ok:
            raise Forbidden(
                f"--mode link would hand uid {req.caller.uid} the cache's own files, which it "
                "could write to (root, hostd's own user, or a user namespace that maps either); "
                "use --mode auto (it copies them), or set [access] link_to_writers = true"
            )
        fs = await self.spawner.start(req.caller, req.pidfd)
        try:
            info = await self.spawner.run(fs.target, str(req.target), req.replace)
            self.storage.check(f"target {str(req.target)!r}", info.chain, info.existing)
            only = None
            if req.mode == "link":  # links or fails, and fails before anything is built
                only = await self.spawner.run(self._link_tiers, fs, info.dev, req)
            tiers = self._tiers(req.tier) if only is None else only
            # (a progressive restore fills an existing target itself, which may be a mount)
            dev = info.existing[0] if req.progressive and info.existing else info.dev
            if req.mode == "auto" and link_ok and not any(t.st_dev() == dev for t in tiers):
                link_ok = False  # nothing can be linked there: every file is a copy, none lent
            lend = (writer or self.lend_all) and link_ok and req.mode != "copy"
            # (the others' links held by leases, where the cache takes them)
            hold = not lend and link_ok and req.mode != "copy" and self.cache.leases is not None
            if req.progressive:
                return await self._placing(
                    req,
                    progress,
                    fs,
                    tiers,
                    lend,
                    link_ok,
                    self.cache.lease_breaks(),
                    target_dev=info.dev,
                    hold=hold,
                )
            res, t0, t1 = await self._resolve(req.ref, req.compat, progress)
            for rebuilds_left in range(REBUILDS, -1, -1):
                since = (
                    self.cache.lease_breaks()
                )  # (this build's: a rebuild's blobs are checked anew)
                try:
                    if not lend and await self._cold(res.manifest, tiers):
                        # Files are written while the rest is fetched, into the hidden build:
                        # one pass of the bytes through the target's filesystem overlaps the
                        # fetch. (A lent blob's mark needs its sync first: that path fills,
                        # then links.)
                        placed = (res, t0, t1)
                        return await self._placing(
                            req, progress, fs, tiers, lend, link_ok, since, placed, hold=hold
                        )
                    async with self._filled(res, tiers, progress, t0, t1) as f:
                        progress.phase = "materialize"
                        if lend:
                            # marked before the links exist: a crash in between must not lose
                            # the mark
                            await self._lend(list(f.where.values()))
                        elif hold:
                            await self._hold(list(f.where.values()))
                        outcome = await self._materialize(f, req, progress, fs, link_ok, since)
                    break
                except BlobMoved as e:
                    # The tree was hidden, and is gone: build it again, the blob checked first.
                    if not rebuilds_left:
                        raise
                    _rebuilding(progress, e)
        finally:
            await self.spawner.run(fs.close)
        t3 = self.clock()
        return {
            **self._result(req, f.resolved, outcome, progress),
            "timings": _timings(f.t0, f.t1, f.t2, t3),
        }

    def _result(
        self, req: RestoreRequest, res: Resolved, outcome: Outcome, progress: Progress
    ) -> dict[str, Any]:
        m = res.manifest
        out: dict[str, Any] = {
            "snapshot": res.snapshot_id,
            "ref": req.ref,
            "target": str(req.target),
            "files": len(m.files),
            "bytes": m.total_bytes,
            "mode": req.mode,
            "linked": outcome.linked,
            "copied": outcome.copied,
            "copied_for_mtime": outcome.mtime_copies,
            "copied_for_mode": outcome.mode_copies,
            "copied_for_link_limit": outcome.limit_copies,
            "created": outcome.created,
            "stale_ref": res.stale,
            "bytes_by_source": _by_source(progress.fill, self.cache),
        }
        if outcome.old_tree_left is not None:
            log.warning("the replaced tree could not be removed: %s", outcome.old_tree_left)
            out["old_tree_left"] = outcome.old_tree_left
        return out

    async def _placing(
        self,
        req: RestoreRequest,
        progress: Progress,
        fs: AsUser,
        tiers: Sequence[Tier],
        lend_first: bool,
        link_ok: bool,
        since: int,
        resolved: tuple[Resolved, float, float] | None = None,
        target_dev: int = -1,
        hold: bool = False,
    ) -> dict[str, Any]:
        """Fill with each file placed as its blob is ready (materialize.Placer). Progressive
        (`resolved` None: resolved here): the target is made at once, files land in it in
        the caller's load order, with a `file` event each. Otherwise, for a cold restore
        already `resolved`: into the hidden build, renamed in at the end. The blobs linked
        are lent first (`lend_first`), or held by read leases (`hold`)."""
        if resolved is None:
            res, t0, t1 = await self._resolve(req.ref, req.compat, progress)
        else:
            res, t0, t1 = resolved
        m = res.manifest
        progress.fill.total_bytes = m.total_bytes
        progress.files_bytes = m.total_bytes
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        where: dict[bytes, Blob] = {}  # each blob announced, on the loop

        def lend(digests: list[bytes]) -> None:  # on the placer's thread, before it links
            async def marked() -> None:
                # Durable first: a lent mark is a row, and no row may precede its blob's sync.
                lent = [where[d] for d in digests]
                await self.filler.durability.flush(lent)
                await self._lend(lent)

            asyncio.run_coroutine_threadsafe(marked(), loop).result()

        def held(digests: list[bytes]) -> None:  # on the placer's thread, before it links
            async def blobs() -> list[Blob]:
                return [where[d] for d in digests]

            self.cache.lease(asyncio.run_coroutine_threadsafe(blobs(), loop).result())

        progressive = resolved is None

        def counted(files: list[mf.FileEntry]) -> None:
            progress.done_files += len(files)

        placer = Placer(
            m,
            fs,
            mode=req.mode,
            link_ok=link_ok,
            cancel=cancel,
            on_files=lambda files: loop.call_soon_threadsafe(
                progress.placed if progressive else counted, files
            ),
            on_symlinks=(
                (lambda links: loop.call_soon_threadsafe(progress.symlinked, links))
                if progressive
                else None
            ),
            lend=lend if lend_first else held if hold else None,
            keep=req.keep_partial,
            progressive=progressive,
            replace=req.replace,
            watch=self._watch(since, where.__getitem__),
        )

        # Blobs announced to the placer in one put per turn of the loop, not one each: the
        # fill's check announces the blobs cached already by the hundred between two awaits.
        announced: list[Ready] = []

        def ready(digest: bytes, b: Blob) -> None:
            where[digest] = b
            if not announced:
                loop.call_soon(tell)
            announced.append(
                Ready(digest, b.tier.blob_file(digest), lambda: b.lent, b.mtime_ns, b.mode)
            )

        def tell() -> None:
            if announced:
                placer.ready(announced[:])
                announced.clear()

        # Pure work over the whole manifest and the caller's patterns: on a thread where
        # there is much of it, so the loop (status, other restores) runs in between.
        paths = [f.path for f in m.files]
        ranks = await _load_order(paths, req.order)
        order = [m.files[i] for i in ranks]
        blobs = m.blobs()
        if req.ranges and progressive:
            # Not those whose blob is cached whole (they land, or link, at once anyway), nor
            # those linked (a range is a write: one a link does not make; nothing links
            # onto another filesystem than the tiers').
            locate = self.cache.locate
            links = link_ok and any(t.st_dev() == target_dev for t in tiers)
            ranged = [
                f.path
                for f in order
                if len(f.chunks) > 1
                and not may_link(f, req.mode, links, blob_mode(f.mode))
                and locate(f.digest) is None
            ][:RANGED_FILES]
            placer.by_ranges(ranged, lambda got: loop.call_soon_threadsafe(progress.ranged, got))

        async def placed() -> Outcome:
            try:
                return await asyncio.shield(job)
            except (TargetError, OSError) as e:  # the helper's write into the caller's tree
                if progressive:
                    if isinstance(e, OSError):  # (the daemon's own: a link)
                        raise TargetError(f"restoring into {str(req.target)!r}: {e}") from e
                    raise
                raise _target_error(req, e) from e

        # Held until the placer has stopped, whatever happens: it reads the blobs.
        with self.cache.holding(blobs):
            # The target (or the build) exists from here. A cancel meanwhile (the client
            # gone) waits for begin's thread: then the placer, told to stop, takes back
            # what begin made, while the helper (and the caller's root it holds) lives.
            begun = asyncio.ensure_future(self.spawner.run(placer.begin))
            try:
                await asyncio.shield(begun)
            except asyncio.CancelledError:
                cancel.set()
                placer.end()
                if await _stopped(begun, fs, str(req.target)) and begun.exception() is None:
                    # (a begin that failed took back what it made itself)
                    taking = asyncio.ensure_future(self.spawner.run(placer.run))
                    if await _stopped(taking, fs, str(req.target)):
                        with contextlib.suppress(Exception):
                            await taking  # raises Cancelled, once taken back
                raise
            job = asyncio.ensure_future(self.spawner.run(placer.run))
            try:
                fill = asyncio.ensure_future(
                    self.filler.ensure(
                        order,
                        m.chunk_size,
                        tiers,
                        progress.fill,
                        ready,
                        placer.tee if req.ranges else None,
                    )
                )
                try:
                    await asyncio.wait({fill, job}, return_when=asyncio.FIRST_COMPLETED)
                finally:  # (this restore cancelled, too)
                    if not fill.done():
                        fill.cancel()
                        await asyncio.wait({fill})
                if job.done():  # before the fill's end: the placer failed (it runs to end())
                    if not fill.cancelled():
                        fill.exception()  # retrieved: the placer's failure is the one told
                    await placed()
                    raise AssertionError("the placer ended before it was told to")
                await fill
                t2 = self.clock()
                progress.phase = "materialize"
                tell()
                placer.end()
                outcome = await placed()
                self._keep_take_back(progress, req, fs, placer)
            except BaseException:
                cancel.set()  # the placer stops between batches; the helper takes back the rest
                placer.end()
                if await _stopped(job, fs, str(req.target)):
                    with contextlib.suppress(Cancelled, Exception):
                        await job
                        # It had placed everything when the cancel came: the stream takes
                        # it back.
                        self._keep_take_back(progress, req, fs, placer)
                raise
            await self._touch(blobs, self.cache.clock())
        t3 = self.clock()
        out = {**self._result(req, res, outcome, progress), "timings": _timings(t0, t1, t2, t3)}
        if progressive:
            out["progressive"] = True
        return out

    def _keep_take_back(
        self, progress: Progress, req: RestoreRequest, fs: AsUser, placer: Placer
    ) -> None:
        """A progressive restore placed everything: keep what it takes to take it back until
        its result has gone out (TakeBack). Not where it keeps what it placed anyway."""
        ledger = fs.ledger  # (a progressive restore's alone)
        if ledger is None or ledger.keep or progress.take_back is not None or fs.root_fd < 0:
            return
        progress.take_back = TakeBack(req.caller, self.spawner, os.dup(fs.root_fd), ledger, placer)

    async def _touch(self, blobs: Iterable[bytes], now: float) -> None:
        """Mark the blobs used, in batches with turns of the loop between them (a lookup per
        blob: 100,000 are ~150 ms that status and other restores would wait for)."""
        ds = list(blobs)
        for i in range(0, len(ds), TOUCH_BATCH):
            self.cache.touch(ds[i : i + TOUCH_BATCH], now)
            await asyncio.sleep(0)

    async def _hold(self, blobs: list[Blob]) -> None:
        """Hold a read lease on each blob a restore is about to link out to a caller that
        cannot write it (Cache.lease, on a thread): those none can be held on are checked
        by their ctime until one is."""
        await asyncio.to_thread(self.cache.lease, blobs)

    async def _lend(self, blobs: list[Blob]) -> None:
        """Cache.lent for a whole tree, in batches with turns of the loop between them (each
        a row per blob: 100,000 would stall status for a second), returning once every
        batch's rows are committed."""
        written = []
        for i in range(0, len(blobs), LEND_BATCH):
            written.append(asyncio.wrap_future(self.cache.lent(blobs[i : i + LEND_BATCH])))
            await asyncio.sleep(0)
        await asyncio.gather(*written)

    def _link_tiers(self, fs: AsUser, dev: int, req: RestoreRequest) -> list[Tier]:
        """The tiers a `link` restore into a target on filesystem `dev` can link from: on that
        filesystem, and seen by the caller (its mount namespace) as the daemon sees them. The
        restore fills only those. None: a UsageError that says why. Blocking (stat, open)."""
        ok: list[Tier] = []
        why: list[str] = []
        for t in self._tiers(req.tier):
            mine = os.stat(t.blobs_dir)
            fd = fs.open_in_view(t.blobs_dir)
            if fd < 0:
                why.append(f"tier {t.name} ({t.root}) is not visible to the caller")
                continue
            try:
                theirs = os.fstat(fd)
            finally:
                os.close(fd)
            if (theirs.st_dev, theirs.st_ino) != (mine.st_dev, mine.st_ino):
                why.append(f"tier {t.name} ({t.root}) is not visible to the caller")
            elif theirs.st_dev != dev:
                why.append(f"tier {t.name} is on another filesystem ({t.root})")
            else:
                ok.append(t)
        if not ok:
            raise UsageError(
                f"field 'mode': cannot link into {str(req.target)!r}: {'; '.join(why)}, and a "
                "hard link cannot cross filesystems; use --mode auto to copy instead"
            )
        return ok

    def _watch(self, since: int, blob: Callable[[bytes], Blob]) -> Watch:
        """What a restore's copies check against a write through a link (materialize.Watch):
        `blob(digest)` is the blob each is copied from, `since` the count of leases broken
        when the restore began. Under leases every blob is watched (a root process reaching
        a non-writer's link may write it), else the lent ones."""
        leases = self.cache.leases

        def recorded(digests: Sequence[bytes]) -> tuple[list[State | None], list[int | None]]:
            blobs = [blob(d) for d in digests]
            states: list[State | None] = [b.state() for b in blobs]
            if leases is None:
                return states, [None] * len(blobs)
            return states, leases.numbers([(b.digest, b.tier.name) for b in blobs])

        def lent(digest: bytes) -> bool:
            return blob(digest).lent

        if leases is None:
            return Watch(lent=lent, recorded=recorded)
        return Watch(
            lent=lent,
            every=True,
            recorded=recorded,
            broken=lambda digests: leases.broken_since(since, digests),
            held=lambda d, dev, ino: leases.holds_on((d, blob(d).tier.name), dev, ino),
        )

    async def _materialize(
        self,
        f: _Filled,
        req: RestoreRequest,
        progress: Progress,
        fs: AsUser,
        link_ok: bool,
        since: int,
    ) -> Outcome:
        cancel = threading.Event()

        def counted(files: list[mf.FileEntry]) -> None:
            progress.done_files += len(files)

        job = asyncio.ensure_future(
            self.spawner.run(
                materialize,
                f.resolved.manifest,
                fs,
                lambda d: f.where[d].tier.blob_file(d),
                mode=req.mode,
                replace=req.replace,
                link_ok=link_ok,
                cancel=cancel,
                on_files=counted,
                watch=self._watch(since, f.where.__getitem__),
                blob_mtime=lambda d: f.where[d].mtime_ns,
                blob_mode=lambda d: f.where[d].mode,
            )
        )
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            cancel.set()  # the thread stops between batches and removes what it built
            if await _stopped(job, fs, str(req.target)):
                with contextlib.suppress(Cancelled, Exception):
                    await job
            raise
        except (TargetError, OSError) as e:  # the helper's write into the caller's filesystem
            raise _target_error(req, e) from e

    async def prefetch(
        self, ref: str, given: Mapping[str, str], tier: str | None, progress: Progress
    ) -> dict[str, Any]:
        res, t0, t1 = await self._resolve(ref, given, progress)
        async with self._filled(res, self._tiers(tier), progress, t0, t1) as f:
            # Where its blobs are now, as `ls` says it: with no tier asked, the first that
            # had room took each.
            held, _ = await asyncio.to_thread(self.cache.presence, f.resolved.snapshot_id)
        return {
            "snapshot": f.resolved.snapshot_id,
            "ref": ref,
            "tier": tier,
            "tiers": held,
            "bytes": f.resolved.manifest.total_bytes,
            "timings": {"resolve": f.t1 - f.t0, "fetch": f.t2 - f.t1, "total": f.t2 - f.t0},
            "bytes_by_source": _by_source(progress.fill, self.cache),
        }


async def _stopped(job: asyncio.Future[Any], fs: AsUser, where: str) -> bool:
    """Give a cancelled restore's thread `job` CANCEL_GRACE to stop, then kill its helper (a
    helper the caller stopped, which the thread waits on) and give it CANCEL_GRACE again.
    Whether it ended: past that the thread is stuck in the caller's filesystem (a write a
    FUSE server never answers) and is left behind, rather than the operation's slot."""
    done, _ = await asyncio.wait({job}, timeout=CANCEL_GRACE)
    if not done:
        fs.kill()
        done, _ = await asyncio.wait({job}, timeout=CANCEL_GRACE)
    if not done:
        log.warning(
            "the restore into %s was cancelled, but its thread is stuck in the caller's "
            "filesystem; left behind",
            where,
        )
        job.add_done_callback(lambda j: j.cancelled() or j.exception())
        return False
    return True


async def _load_order(paths: list[str], patterns: Sequence[str]) -> list[int]:
    """pathfilter.load_order: on the loop where it is little work, else on a thread that
    stops when the restore is given up (its caller gone: the work must not outlive it, on a
    thread the loop's other jobs queue behind); refused past ORDER_WORK."""
    work = order_work(paths, patterns)
    if work <= ORDER_INLINE:
        return load_order(paths, patterns)
    if work > ORDER_WORK:
        raise UsageError(
            f"field 'order': {len(patterns)} patterns of {sum(map(len, patterns))} characters "
            f"over {len(paths)} files is more matching than a load order gets (at most "
            f"{ORDER_WORK:.0e} characters x files); give fewer or shorter patterns"
        )
    given_up = threading.Event()
    job = asyncio.ensure_future(asyncio.to_thread(load_order, paths, patterns, given_up.is_set))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        given_up.set()
        job.add_done_callback(unheard)
        raise


@dataclass(frozen=True)
class _Filled:
    resolved: Resolved
    where: dict[bytes, Blob]
    t0: float
    t1: float
    t2: float


def _target_error(req: RestoreRequest, e: TargetError | OSError) -> TargetError:
    """A failure to write the caller's tree, said as such (the build never landed)."""
    if isinstance(e, TargetError):
        why = e.message
    else:
        why = f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}"
    return TargetError(f"restoring into {str(req.target)!r} failed: {why}; the target is as it was")


def _value_for(fact: str, given: Mapping[str, str], host: Mapping[str, str]) -> str:
    """What to give as `fact` in a publish for this host: the client's value, else the
    host's own where it knows one, else a placeholder."""
    value = given.get(fact, host.get(fact, compat.UNKNOWN))
    return "VALUE" if value == compat.UNKNOWN else value


def _shown(facts: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in facts.items())


def _timings(t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
    return {"resolve": t1 - t0, "fetch": t2 - t1, "materialize": t3 - t2, "total": t3 - t0}


def _rebuilding(progress: Progress, e: BlobMoved) -> None:
    """A restore builds its tree again (REBUILDS): said in a warning; the counts start over
    (`bytes_by_source` then tells where the tree's bytes came from, its total the snapshot's,
    as always: what the first pass fetched is in hostd_chunk_fetched_bytes)."""
    how = (
        f"moved while it was copied, and the copy could not be read back ({e.why})"
        if e.why
        else "was written to through a link while it was copied"
    )
    message = (
        f"blob {e.digest.hex()} ({e.path!r}), linked out, {how}: the copy was not "
        "handed over, and the tree is built again"
    )
    log.warning("%s", message)
    progress.warnings.append(
        {"warning": "rebuilt", "digest": e.digest.hex(), "path": e.path, "message": message}
    )
    progress.fill = FillProgress()
    progress.phase, progress.done_files = "fetch", 0


def _by_source(fill: FillProgress, cache: Cache) -> dict[str, int]:
    out = {t.name: 0 for t in cache.tiers}
    out["origin"] = 0
    out.update(fill.by_source)
    return out
