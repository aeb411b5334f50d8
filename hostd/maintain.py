"""Maintenance: gc (drop what nothing needs) and verify (re-hash every cached blob)."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from hostd.cache import Cache
from hostd.restore import Progress

log = logging.getLogger(__name__)


async def gc(cache: Cache, busy: Collection[bytes]) -> dict[str, Any]:
    """Remove partial blobs no fill is using, blobs no known snapshot names, and bring every
    tier within its budget. `busy`: digests being filled right now."""
    wanted = {f.digest for s in cache.snapshots() for f in s.manifest.files}
    removed_blobs = removed_partials = freed = 0
    for u in list(cache.usage()):
        tier = cache.tier(u.name)
        for digest in list(cache.digests(tier)):
            b = cache.locate(digest, [tier]) or cache.partial(digest)
            if b is None or b.tier is not tier or digest in busy or cache.is_held(digest):
                continue
            if not b.complete:
                removed_partials += 1
            elif digest in wanted:
                continue
            else:
                removed_blobs += 1
            freed += b.size
            await cache.remove(digest, tier)
    await cache.enforce_budgets()
    return {
        "removed_blobs": removed_blobs,
        "removed_partials": removed_partials,
        "freed_bytes": freed,
    }


async def verify(cache: Cache, progress: Progress) -> dict[str, Any]:
    """Re-hash every complete blob in every tier; drop and report the bad ones."""
    copies = [b for t in cache.tiers for d in cache.digests(t) if (b := cache.locate(d, [t]))]
    progress.phase = "verify"
    progress.fill.total_bytes = sum(b.size for b in copies)
    progress.total_files = len(copies)
    bad: list[dict[str, str]] = []
    checked = skipped = gone = 0
    for b in copies:
        if b.chunk_size <= 0:
            # No known manifest names it, so its chunk size (part of its digest) is unknown:
            # unreferenced, not bad. gc removes such blobs.
            skipped += 1
            continue
        r = await cache.rehash(b)
        why = r.why
        if cache.locate(b.digest, [b.tier]) is not b:
            # Evicted, demoted or replaced while it was hashed: what was read says nothing of
            # what the tier holds now, and remove() would drop that instead.
            gone += 1
            progress.fill.done_bytes += b.size
            progress.done_files += 1
            continue
        if why is not None:
            log.warning("verify: blob %s in tier %s is bad: %s", b.digest.hex(), b.tier.name, why)
            bad.append({"blob": b.digest.hex(), "tier": b.tier.name, "reason": why})
        await cache.settle(b, r)
        checked += b.size
        progress.fill.done_bytes += b.size
        progress.done_files += 1
    return {
        "checked_blobs": len(copies) - skipped - gone,
        "checked_bytes": checked,
        "skipped_unreferenced": skipped,
        "bad": bad,
    }
