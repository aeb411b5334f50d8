"""Refs at the origin: listing them, inspecting a snapshot, and their history and rollback.

A ref under one compat key is the object `refs/<ref>/<compat>` (the snapshot id every reader
resolves, unchanged) plus, since this hostd, its history: `history/<ref>/<compat>/<seq>`, one
entry per time it was set (core/refentry.py, docs/FORMAT.md section 6). `RefLog.move` is the
one way hostd sets a ref: the next entry first, then the ref object, so the newest entry is
always what the ref was last set to (a writer stopped in between leaves an entry the ref
object does not show yet; `ref history` marks which one is current). Two hosts setting one
ref at once may leave one's entry on top of the other's ref object: the host whose snapshot
the ref names then appends an entry naming it (`_settle`). A rollback (`ref set`) is a new
entry naming an old id: the sequence only goes up.

Entries are read with a cap and checked against their own key; the ref object stays the
source of truth for a restore. On an origin that cannot list (plain HTTP) a ref is set
without history, and `refs` and `ref history` say they cannot list.

Must not: change what a restore resolves, write a ref to a snapshot whose manifest is not at
the origin, or let one unreadable entry or manifest fail a whole listing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from hostd.cache import Cache
from hostd.core import manifest as mf
from hostd.core import refentry
from hostd.core.ids import compat_digest
from hostd.core.select import looks_like_id, match_id
from hostd.errors import HostdError, NotFound, OriginError
from hostd.origin import Origin, validate_ref
from hostd.restore import Resolver

T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_LISTED_REFS = 10_000
MAX_LISTED_FILES = 100_000  # inspect's file list; `files` still counts them all
HISTORY_SHOWN = 20  # entries per compat key `ref history` reads by default
SEARCHED_ENTRIES = 200  # entries per compat key an id prefix is matched against
_PARALLEL = 8  # origin reads a listing makes at once (the origin's own limit still holds)
SETTLE_TRIES = 3  # entries a move appends at most after finding another host's on top


@dataclass(frozen=True, slots=True)
class Moved:
    seq: int | None  # the new entry's, None where the origin keeps no history
    previous: str | None  # the snapshot the ref pointed at before, if any


class RefLog:
    """Sets refs at the origin, keeping their history."""

    def __init__(self, origin: Origin, *, now: Callable[[], float] = time.time) -> None:
        self.origin = origin
        self.now = now

    def __repr__(self) -> str:
        return f"RefLog({self.origin.url})"

    async def move(self, ref: str, digest: str, snapshot_id: str) -> Moved:
        """Point `ref` under compat key `digest` at `snapshot_id`, as the next entry of its
        history. A ref set before history was kept gets its current target as entry 1 first,
        so a rollback can name it. Setting a ref to what it already is adds no entry."""
        seqs = await self.origin.list_history(ref, digest)
        current = await self.origin.get_ref(ref, digest)
        if seqs is None:  # cannot list: no history, the ref alone (as before history)
            await self.origin.put_ref(ref, digest, snapshot_id)
            return Moved(None, current)
        last = seqs[-1] if seqs else 0
        if last == 0 and current is not None:
            at = await self.origin.ref_modified(ref, digest)
            await self._write(ref, digest, 1, current, at)
            last = 1
        if current == snapshot_id and last:
            raw = await self.origin.get_history(ref, digest, last)
            if raw is not None and _decoded(raw, ref, digest, last).snapshot == snapshot_id:
                await self.origin.put_ref(ref, digest, snapshot_id)  # as publish always did
                return Moved(last, current)
        await self._write(ref, digest, last + 1, snapshot_id, None)
        await self.origin.put_ref(ref, digest, snapshot_id)
        try:
            seq = await self._settle(ref, digest, snapshot_id, last + 1)
        except (OriginError, refentry.EntryError) as e:  # the ref is set: that stands
            log.warning("ref %s: could not check its history after setting it: %s", ref, e)
            seq = last + 1
        return Moved(seq, current)

    async def _settle(self, ref: str, digest: str, sid: str, seq: int) -> int:
        """Two hosts that set one ref at once both read the same last entry: the entry of
        one may survive beside the ref object of the other, and the ref then names a
        snapshot its history never recorded (a rollback cannot find it). So, the ref set,
        the host whose snapshot it still names makes sure the newest entry names it too,
        appending one where not (a few times at most: every such host does the same). The
        seq of the entry that names it."""
        for _ in range(SETTLE_TRIES):
            if await self.origin.get_ref(ref, digest) != sid:
                return seq  # another host's now: its own move settles it
            seqs = await self.origin.list_history(ref, digest)
            if not seqs:
                return seq
            raw = await self.origin.get_history(ref, digest, seqs[-1])
            if raw is not None and _decoded(raw, ref, digest, seqs[-1]).snapshot == sid:
                return seqs[-1]
            seq = seqs[-1] + 1
            await self._write(ref, digest, seq, sid, None)
        return seq

    async def _write(self, ref: str, digest: str, seq: int, sid: str, at: float | None) -> None:
        when = int(at if at is not None else self.now())
        entry = refentry.Entry(ref, digest, seq, sid, max(0, when))
        await self.origin.put_history(ref, digest, seq, refentry.encode(entry))

    async def entries(self, ref: str, digest: str, limit: int) -> tuple[list[Any], int] | None:
        """The newest `limit` entries under one compat key, newest first (an unreadable one
        as {"seq", "error"}), and how many older ones were left out; None if it cannot list."""
        seqs = await self.origin.list_history(ref, digest)
        if seqs is None:
            return None
        shown = seqs[::-1][:limit]

        async def one(seq: int) -> Any:
            try:
                raw = await self.origin.get_history(ref, digest, seq)
                if raw is None:
                    return {"seq": seq, "error": "removed while it was listed"}
                return _decoded(raw, ref, digest, seq)
            except (OriginError, refentry.EntryError) as e:
                return {"seq": seq, "error": str(e)}

        return await _bounded(map(one, shown)), len(seqs) - len(shown)


def _decoded(raw: bytes, ref: str, digest: str, seq: int) -> refentry.Entry:
    try:
        return refentry.decode(raw, ref=ref, compat=digest, seq=seq)
    except refentry.EntryError as e:
        raise refentry.EntryError(
            f"history entry {seq} of ref {ref} under compat key {digest}: {e}"
        ) from e


async def _bounded(calls: Iterable[Awaitable[T]]) -> list[T]:
    sem = asyncio.Semaphore(_PARALLEL)

    async def run(c: Awaitable[T]) -> T:
        async with sem:
            return await c

    return list(await asyncio.gather(*map(run, calls)))


def _cannot_list(origin: Origin, what: str) -> OriginError:
    return OriginError(f"origin {origin.url} cannot list objects (plain HTTP): {what} needs one")


async def _summary(resolver: Resolver, cache: Cache, sid: str) -> dict[str, Any]:
    """Files, bytes and compat facts of a snapshot: the local record, else its manifest."""
    s = cache.snapshot(sid)
    if s is not None:
        return {"files": s.files, "bytes": s.bytes, "compat": dict(s.compat)}
    try:
        m = await resolver.manifest(sid)
    except HostdError as e:
        return {"error": e.message}
    return {"files": len(m.files), "bytes": m.total_bytes, "compat": dict(m.compat)}


async def list_refs(
    origin: Origin, resolver: Resolver, cache: Cache, prefix: str
) -> dict[str, Any]:
    """`hostd refs [PREFIX]`: each ref at the origin under each compat key, with its snapshot,
    the snapshot's size and facts, and when the ref was last set."""
    got = await origin.list_refs(prefix, MAX_LISTED_REFS)
    if got is None:
        raise _cannot_list(origin, "listing refs")
    keys, truncated = got

    async def one(ref: str, digest: str, modified: float) -> dict[str, Any] | None:
        try:
            sid = await origin.get_ref(ref, digest)
        except OriginError as e:
            return {"ref": ref, "compat_digest": digest, "updated": modified, "error": e.message}
        if sid is None:  # removed since it was listed
            return None
        return {
            "ref": ref,
            "compat_digest": digest,
            "snapshot": sid,
            "updated": modified,
            **await _summary(resolver, cache, sid),
        }

    rows = await _bounded(one(*k) for k in keys)
    return {
        "origin": origin.url,
        "prefix": prefix,
        "refs": [r for r in rows if r is not None],
        "truncated": truncated,
    }


async def history(
    log: RefLog, resolver: Resolver, cache: Cache, ref: str, limit: int = HISTORY_SHOWN
) -> dict[str, Any]:
    """`hostd ref history REF`: per compat key, the current target and the newest entries."""
    validate_ref(ref)
    origin = log.origin
    digests = await origin.list_ref(ref)
    if digests is None:
        raise _cannot_list(origin, "ref history")
    if not digests:
        raise NotFound(f"no such ref {ref!r} at origin {origin.url}")
    keys: list[dict[str, Any]] = []
    for d in digests:
        current = await origin.get_ref(ref, d)
        listed = await log.entries(ref, d, limit)
        found, older = listed if listed is not None else ([], 0)
        rows: list[dict[str, Any]] = []
        marked = False
        for e in found:
            if isinstance(e, refentry.Entry):
                is_current = not marked and e.snapshot == current
                marked = marked or is_current
                rows.append({**e.to_json(), "current": is_current})
            else:
                rows.append({**e, "current": False})
        if not found and older == 0 and current is not None:
            rows.append(
                {
                    "seq": None,
                    "snapshot": current,
                    "at": await origin.ref_modified(ref, d),
                    "current": True,
                    "note": "set before hostd kept ref history",
                }
            )
        summary = await _summary(resolver, cache, current) if current else {}
        keys.append(
            {
                "compat_digest": d,
                "compat": summary.get("compat", {}),
                "snapshot": current,
                "entries": rows,
                "older": older,
            }
        )
    return {"ref": ref, "keys": keys}


async def set_ref(
    log: RefLog, resolver: Resolver, cache: Cache, ref: str, id_text: str
) -> dict[str, Any]:
    """`hostd ref set REF ID`: point REF (under the snapshot's own compat key) at a snapshot
    whose manifest is at the origin, as a new history entry."""
    validate_ref(ref)
    origin = log.origin
    if len(id_text) == 64 and looks_like_id(id_text):
        sid = id_text
    else:
        sid = match_id(id_text, await _ids_for(log, cache, ref))
    if await origin.manifest_modified(sid) is None:
        raise NotFound(
            f"snapshot {sid} has no manifest at origin {origin.url}: a ref can only point at "
            "a published snapshot"
        )
    m = await resolver.manifest(sid)
    digest = compat_digest(m.compat)
    moved = await log.move(ref, digest, sid)
    cache.index.put_ref(ref, digest, sid, time.time())
    return {
        "ref": ref,
        "snapshot": sid,
        "previous": moved.previous,
        "seq": moved.seq,
        "compat_digest": digest,
        "compat": dict(m.compat),
    }


async def _ids_for(log: RefLog, cache: Cache, ref: str) -> set[str]:
    """The snapshot ids an id prefix given to `ref set REF` is matched against: those this
    host knows or resolved a ref to, and those in REF's recent history."""
    ids = {s.id for s in cache.snapshots()} | {sid for _, sid, _ in cache.index.ref_targets()}
    for d in await log.origin.list_ref(ref) or []:
        listed = await log.entries(ref, d, SEARCHED_ENTRIES)
        for e in listed[0] if listed is not None else []:
            if isinstance(e, refentry.Entry):
                ids.add(e.snapshot)
        current = await log.origin.get_ref(ref, d)
        if current is not None:
            ids.add(current)
    return ids


async def inspect(
    origin: Origin, resolver: Resolver, cache: Cache, name: str, given: Mapping[str, str]
) -> dict[str, Any]:
    """`hostd inspect REF|ID`: a snapshot's manifest summary and its entries. An argument
    that is a full id, or a unique prefix of an id this host knows, is that snapshot;
    anything else is a ref, resolved for this host."""
    known = {s.id for s in cache.snapshots()} | {sid for _, sid, _ in cache.index.ref_targets()}
    ref: str | None = None
    if looks_like_id(name) and (len(name) == 64 or any(k.startswith(name) for k in known)):
        sid = match_id(name, known)
        m = await resolver.manifest(sid)
    else:
        res = await resolver.resolve(name, given)
        ref, sid, m = name, res.snapshot_id, res.manifest
    try:
        created = await origin.manifest_modified(sid)
    except OriginError:
        created = None
    s = cache.snapshot(sid)
    body = await asyncio.to_thread(_describe, m)
    return {
        "snapshot": sid,
        "ref": ref,
        "created": created,
        "cached": s is not None,
        "pinned": bool(s is not None and s.pinned),
        **body,
    }


def _describe(m: mf.Manifest) -> dict[str, Any]:
    """The manifest as JSON: its summary, then its entries (blocking for a big one)."""
    files: Sequence[mf.FileEntry] = m.files[:MAX_LISTED_FILES]
    return {
        "format": m.format,
        "chunk_size": m.chunk_size,
        "files": len(m.files),
        "bytes": m.total_bytes,
        "chunks": m.chunk_count,
        "packs": len(m.packs),
        "symlinks": len(m.symlinks),
        "dirs": len(m.dirs),
        "compat": dict(m.compat),
        "meta": dict(m.meta),
        "file_list": [
            {
                "path": f.path,
                "size": f.size,
                "mode": f.mode,
                "mtime": f.mtime,
                "chunks": len(f.chunks),
            }
            for f in files
        ],
        "files_left_out": len(m.files) - len(files),
        "symlink_list": [{"path": s.path, "target": s.target} for s in m.symlinks],
        "dir_list": list(m.dirs),
    }
