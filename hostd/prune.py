"""rm and prune: forget cached snapshots by name or by policy, and remove the blobs only they
named.

Both act on this host's cache alone, never on the origin: a forgotten snapshot is fetched
again by the next restore of its ref. A pinned snapshot is never dropped (`rm` refuses it,
naming the unpin to run first; `prune` keeps it and says so); one a running restore uses is
left, and reported. What goes is decided by pure code (`core/select.py`); this module
gathers what it needs (records, the refs this host resolved, blob lists) and carries it out
with gc's own steps: `Cache.forget`, then removing the blobs no remaining snapshot names.

Must not: block the loop on an index read of a snapshot's blob list (threads), or remove a
blob another snapshot, a pin, a running restore or a fill still needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from hostd.cache import Cache
from hostd.core.select import Candidate, looks_like_id, match_id, prune_plan
from hostd.errors import NotFound, Pinned, UsageError
from hostd.origin import validate_ref


def ref_targets(cache: Cache) -> dict[str, dict[str, float]]:
    """For each known snapshot, the refs this host resolved to it and when it last did."""
    out: dict[str, dict[str, float]] = {}
    for ref, sid, seen in cache.index.ref_targets():
        if cache.snapshot(sid) is not None:
            out.setdefault(sid, {})[ref] = seen
    return out


def known_id(cache: Cache, text: str) -> str:
    """A snapshot known on this host, by full id or unique prefix (pin, unpin, rm)."""
    sid = match_id(text, (s.id for s in cache.snapshots()))
    if cache.snapshot(sid) is None:
        raise NotFound(f"snapshot {sid} is not known on this host (prefetch it first)")
    return sid


def select(cache: Cache, names: Sequence[str]) -> dict[str, list[str]]:
    """What each of `names` (a ref this host resolved, or a snapshot id or unique prefix)
    names among the known snapshots: name -> ids."""
    if not names:
        raise UsageError("name at least one REF or snapshot ID to remove")
    by_ref: dict[str, list[str]] = {}
    for sid, refs in ref_targets(cache).items():
        for ref in refs:
            by_ref.setdefault(ref, []).append(sid)
    out: dict[str, list[str]] = {}
    for name in names:
        if name in by_ref and not (len(name) == 64 and looks_like_id(name)):
            ids = by_ref[name]
            if looks_like_id(name) and any(s.id.startswith(name) for s in cache.snapshots()):
                raise UsageError(
                    f"{name!r} is both a ref and a snapshot id prefix: give the id in full, "
                    "or more of it"
                )
            out[name] = sorted(ids)
        elif looks_like_id(name):
            out[name] = [known_id(cache, name)]
        else:
            validate_ref(name)
            raise NotFound(f"no snapshot of ref {name!r} is cached on this host")
    return out


async def rm(cache: Cache, names: Sequence[str], busy: Collection[bytes]) -> dict[str, Any]:
    """Forget the snapshots `names` name and remove the blobs only they named. Refuses, with
    nothing changed, if one of them is pinned."""
    chosen = select(cache, names)
    ids = sorted({sid for group in chosen.values() for sid in group})
    pinned = [sid for sid in ids if (s := cache.snapshot(sid)) is not None and s.pinned]
    if pinned:
        shown = ", ".join(pinned)
        raise Pinned(
            f"snapshot {shown} is pinned; nothing was removed. Unpin it first "
            f"(hostd unpin --snapshot {pinned[0][:12]}), then remove it"
        )
    return await _drop(cache, ids, busy, ref_targets(cache))


async def prune(
    cache: Cache,
    *,
    keep: int | None,
    unused_for: float | None,
    dry_run: bool,
    busy: Collection[bytes],
) -> dict[str, Any]:
    """Forget what the policy lets go (core/select.py `prune_plan`); with `dry_run`, only say
    what that would be."""
    refs = ref_targets(cache)
    snaps = sorted(cache.snapshots(), key=lambda s: (-s.last_used, s.id))
    plan = prune_plan(
        [Candidate(s.id, s.last_used, s.pinned, s.bytes, refs.get(s.id, {})) for s in snaps],
        keep=keep,
        unused_for=unused_for,
        now=cache.clock(),
    )
    drop = [v.id for v in plan if v.drop]
    why = {v.id: v.why for v in plan}
    if dry_run:
        exclusive = await _exclusive_blobs(cache, drop)
        result: dict[str, Any] = {
            "removed": [_row(cache, sid, refs, why) for sid in drop],
            "in_use": [],
            "removed_blobs": 0,
            "freed_bytes": _cached_bytes(cache, exclusive),
        }
    else:
        result = await _drop(cache, drop, busy, refs, why)
    dropped = {r["snapshot"] for r in result["removed"]} | {r["snapshot"] for r in result["in_use"]}
    result["kept"] = [_row(cache, v.id, refs, why) for v in plan if v.id not in dropped]
    result["dry_run"] = dry_run
    return result


async def _drop(
    cache: Cache,
    ids: Sequence[str],
    busy: Collection[bytes],
    refs: dict[str, dict[str, float]],
    why: dict[str, str] | None = None,
) -> dict[str, Any]:
    rows = {sid: _row(cache, sid, refs, why) for sid in ids}
    exclusive = await _exclusive_blobs(cache, ids)
    forgot, in_use = await cache.forget(ids)
    removed = freed = 0
    if forgot:
        # Named again since (a restore recorded a snapshot that shares them)? Then they stay.
        wanted = await cache.named_blobs()
        for d in exclusive:
            if d in wanted or d in busy or cache.pinned(d) or cache.is_held(d):
                continue
            for b in cache.copies(d):
                removed += 1
                freed += b.charged
                await cache.remove(d, b.tier)
    return {
        "removed": [rows[sid] for sid in forgot],
        "in_use": [rows[sid] for sid in in_use],
        "removed_blobs": removed,
        "freed_bytes": freed,
    }


def _row(
    cache: Cache, sid: str, refs: dict[str, dict[str, float]], why: dict[str, str] | None
) -> dict[str, Any]:
    s = cache.snapshot(sid)
    row: dict[str, Any] = {
        "snapshot": sid,
        "refs": sorted(refs.get(sid, {})),
        "bytes": s.bytes if s is not None else 0,
        "files": s.files if s is not None else 0,
        "last_used": s.last_used if s is not None else None,
        "pinned": bool(s is not None and s.pinned),
    }
    if why is not None:
        row["why"] = why.get(sid, "")
    return row


async def _exclusive_blobs(cache: Cache, ids: Iterable[str]) -> set[bytes]:
    """The blobs the snapshots `ids` name that no other known snapshot does (their blob
    lists are index reads: in a thread)."""
    chosen = set(ids)
    others = [s.id for s in cache.snapshots() if s.id not in chosen]

    def read() -> set[bytes]:
        mine = {d for sid in chosen for d, _ in cache.snaps.blob_sizes(sid)}
        return mine.difference(d for sid in others for d, _ in cache.snaps.blob_sizes(sid))

    return await asyncio.to_thread(read)


def _cached_bytes(cache: Cache, digests: Iterable[bytes]) -> int:
    return sum(b.charged for d in digests for b in cache.copies(d))
