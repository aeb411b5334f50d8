"""Restore and prefetch: ref -> snapshot id -> manifest -> complete blobs -> target tree.

Resolution asks the origin for the ref under the compat keys this host fits, most specific
first, and remembers each answer in the index so a restore of a cached snapshot still works
while the origin is down. Bytes move in fill.py; files are made in materialize.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostd.asuser import AsUser, Spawner, Storage
from hostd.cache import Blob, Cache
from hostd.caller import Caller, could_write_cache
from hostd.core import compat
from hostd.core import manifest as mf
from hostd.core.ids import compat_digest, is_hex_id
from hostd.errors import Forbidden, ManifestError, NotFound, OriginError, TargetError, UsageError
from hostd.fill import Filler, FillProgress
from hostd.materialize import Cancelled, Outcome, materialize
from hostd.origin import Origin, RetryNote, validate_ref
from hostd.snapshots import decode_manifest
from hostd.tier import Tier

log = logging.getLogger(__name__)
CANCEL_GRACE = 10.0  # seconds a cancelled materialize gets to remove what it built
# Blobs a restore marks used between turns of the loop.
TOUCH_BATCH = 4096
LEND_BATCH = 1024  # lent marks: a row each


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


@dataclass(frozen=True)
class Resolved:
    snapshot_id: str
    manifest: mf.Manifest
    stale: bool  # answered from the local record because the origin was unreachable


class Resolver:
    def __init__(self, origin: Origin, cache: Cache, compat_facts: Sequence[str]) -> None:
        self.origin = origin
        self.cache = cache
        self.compat_facts = tuple(compat_facts)

    def __repr__(self) -> str:
        return f"Resolver({self.origin.url}, facts={self.compat_facts})"

    async def resolve(self, ref: str, given: Mapping[str, str]) -> Resolved:
        """A ref (or a snapshot id) to its manifest for this host's compat facts."""
        if is_hex_id(ref):
            return Resolved(ref, await self.manifest(ref), False)
        validate_ref(ref)
        host = compat.host_facts(self.compat_facts, given)
        digests = [
            compat_digest(facts) for facts in compat.lookup_digests(self.compat_facts, given, host)
        ]
        try:
            sid = await self._lookup(ref, digests, host)
        except OriginError as e:
            for d in digests:
                local = self.cache.index.get_ref(ref, d)
                if local is not None and self.cache.snapshot(local) is not None:
                    log.warning(
                        "origin unreachable; using the last known %s -> %s: %s", ref, local, e
                    )
                    return Resolved(local, await self.manifest(local), True)
            raise
        return Resolved(sid, await self.manifest(sid), False)

    async def _lookup(self, ref: str, digests: Sequence[str], host: Mapping[str, str]) -> str:
        for d in digests:
            sid = await self.origin.get_ref(ref, d)
            if sid is not None:
                self.cache.index.put_ref(ref, d, sid, time.time())
                return sid
        # Published under another set of facts: list the ref's keys and pick the snapshot
        # that names the most facts, all of which this host has.
        listed = await self.origin.list_ref(ref)
        best: tuple[int, str, str] | None = None
        for d in listed or []:
            if d in digests:
                continue
            sid = await self.origin.get_ref(ref, d)
            if sid is None:
                continue
            m = await self.manifest(sid)
            if compat.matches(m.compat, host) and (best is None or len(m.compat) > best[0]):
                best = (len(m.compat), sid, d)
        if best is not None:
            self.cache.index.put_ref(ref, best[2], best[1], time.time())
            return best[1]
        if listed:
            raise NotFound(
                f"ref {ref!r} has no snapshot for this host's compat facts "
                f"({', '.join(f'{k}={v}' for k, v in host.items())}): boot from scratch and "
                "publish one"
            )
        raise NotFound(f"no such ref {ref!r} at origin {self.origin.url}")

    async def manifest(self, snapshot_id: str) -> mf.Manifest:
        local = await self.cache.load_manifest(snapshot_id)
        if local is not None:
            return local
        data = await self.origin.get_manifest(snapshot_id)
        try:
            m = await asyncio.to_thread(decode_manifest, data)
        except ManifestError as e:  # name the manifest: decode only knows its bytes
            raise ManifestError(
                f"manifest {snapshot_id} at origin {self.origin.url}: {e.message}"
            ) from e
        if m.snapshot_id != snapshot_id:
            raise ManifestError(f"manifest {snapshot_id} at the origin does not hash to its id")
        return m


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.filler = filler
        self.resolver = resolver
        self.storage = storage
        self.spawner = spawner
        self.link_to_writers = link_to_writers
        self.clock = clock

    def __repr__(self) -> str:
        return f"Restorer({self.resolver!r})"

    def _tiers(self, name: str | None) -> Sequence[Tier]:
        return self.cache.tiers if name is None else [self.cache.tier(name)]

    @contextlib.asynccontextmanager
    async def _filled(
        self,
        ref: str,
        given: Mapping[str, str],
        tier: str | None,
        progress: Progress,
        only: Sequence[Tier] | None = None,
    ) -> AsyncIterator[_Filled]:
        """Resolve, then make every blob complete (in `only`'s tiers where given, else the
        named one or any); the blobs stay held while the body runs."""
        t0 = self.clock()
        tiers = self._tiers(tier) if only is None else only
        res = await self.resolver.resolve(ref, given)
        m = res.manifest
        self.cache.record_snapshot(m)
        t1 = self.clock()
        progress.phase, progress.total_files = "fetch", len(m.files)
        progress.admitted = True  # resolved: what fails from here is an `error` event
        blobs = m.blobs()
        with self.cache.holding(blobs):
            # every file: of those sharing a blob, the fill picks the mtime most of them have
            where = await self.filler.ensure(m.files, m.chunk_size, tiers, progress.fill)
            now = self.cache.clock()
            yield _Filled(res, where, t0, t1, self.clock())
            # One use, marked in batches with turns of the loop between them (a lookup per
            # blob: 100,000 are ~150 ms that status and other restores would wait for).
            # After the body, still held: the index writes it queues would otherwise hold
            # the GIL while the tree is built.
            ds = list(blobs)
            for i in range(0, len(ds), TOUCH_BATCH):
                self.cache.touch(ds[i : i + TOUCH_BATCH], now)
                await asyncio.sleep(0)

    async def restore(self, req: RestoreRequest, progress: Progress) -> dict[str, Any]:
        writer = could_write_cache(req.caller, os.geteuid(), req.pidfd)
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
            async with self._filled(req.ref, req.compat, req.tier, progress, only) as f:
                progress.phase = "materialize"
                if writer and link_ok and req.mode != "copy":
                    # marked before the links exist: a crash in between must not lose the mark
                    await self._lend(list(f.where.values()))
                outcome = await self._materialize(f, req, progress, fs, link_ok)
        finally:
            await self.spawner.run(fs.close)
        t3 = self.clock()
        m = f.resolved.manifest
        out = {
            "snapshot": f.resolved.snapshot_id,
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
            "stale_ref": f.resolved.stale,
            "timings": _timings(f.t0, f.t1, f.t2, t3),
            "bytes_by_source": _by_source(progress.fill, self.cache),
        }
        if outcome.old_tree_left is not None:
            log.warning("the replaced tree could not be removed: %s", outcome.old_tree_left)
            out["old_tree_left"] = outcome.old_tree_left
        return out

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

    async def _materialize(
        self, f: _Filled, req: RestoreRequest, progress: Progress, fs: AsUser, link_ok: bool
    ) -> Outcome:
        cancel = threading.Event()

        def counted(_size: int) -> None:
            progress.done_files += 1

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
                on_file=counted,
                lent=lambda d: f.where[d].lent,
                blob_mtime=lambda d: f.where[d].mtime_ns,
            )
        )
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            cancel.set()  # the thread stops between batches and removes what it built
            done, _ = await asyncio.wait({job}, timeout=CANCEL_GRACE)
            if not done:  # a helper the caller stopped: the thread waits on it, kill it
                fs.kill()
            with contextlib.suppress(Cancelled, Exception):
                await job
            raise
        except TargetError as e:  # the helper's write into the caller's filesystem
            raise TargetError(
                f"restoring into {str(req.target)!r} failed: {e.message}; the target is as it was"
            ) from e
        except OSError as e:
            raise TargetError(
                f"restoring into {str(req.target)!r} failed: {e.strerror or e}"
                f"{f' ({e.filename})' if e.filename else ''}; the target is as it was"
            ) from e

    async def prefetch(
        self, ref: str, given: Mapping[str, str], tier: str | None, progress: Progress
    ) -> dict[str, Any]:
        async with self._filled(ref, given, tier, progress) as f:
            pass
        return {
            "snapshot": f.resolved.snapshot_id,
            "ref": ref,
            "tier": tier,
            "bytes": f.resolved.manifest.total_bytes,
            "timings": {"resolve": f.t1 - f.t0, "fetch": f.t2 - f.t1, "total": f.t2 - f.t0},
            "bytes_by_source": _by_source(progress.fill, self.cache),
        }


@dataclass(frozen=True)
class _Filled:
    resolved: Resolved
    where: dict[bytes, Blob]
    t0: float
    t1: float
    t2: float


def _timings(t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
    return {"resolve": t1 - t0, "fetch": t2 - t1, "materialize": t3 - t2, "total": t3 - t0}


def _by_source(fill: FillProgress, cache: Cache) -> dict[str, int]:
    out = {t.name: 0 for t in cache.tiers}
    out["origin"] = 0
    out.update(fill.by_source)
    return out
