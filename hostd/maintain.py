"""Maintenance: gc (drop what nothing needs) and verify (re-hash every cached blob).

Both walk every blob, so both yield to the loop as they go; neither decodes a manifest on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterator
from typing import Any

from hostd.blobs import Digests
from hostd.cache import Blob, Cache
from hostd.restore import Progress
from hostd.tier import Tier

log = logging.getLogger(__name__)


async def gc(cache: Cache, busy: Collection[bytes]) -> dict[str, Any]:
    """Forget the snapshots no ref names and no pin holds (unless a restore is using one),
    then remove partial blobs no fill is using and blobs no known snapshot names, and bring
    every tier within its budget. `busy`: digests being filled right now."""
    # A blob used since gc began belongs to a restore that recorded its snapshot meanwhile,
    # which `wanted` may not show: it stays.
    started = cache.clock()
    forgot = await cache.forget_unnamed()
    wanted = await cache.named_blobs()
    removed_blobs = removed_partials = freed = 0
    for u in list(cache.usage()):
        tier = cache.tier(u.name)
        for i, digest in enumerate(cache.digests(tier)):
            if i % 4096 == 4095:
                await asyncio.sleep(0)  # a tier of many blobs: let the loop breathe
            b = cache.locate(digest, [tier]) or cache.partial(digest)
            if b is None or b.tier is not tier or digest in busy or cache.is_held(digest):
                continue
            if not b.complete:
                removed_partials += 1
            elif digest in wanted or cache.pinned(digest) or b.last_used > started:
                continue
            else:
                removed_blobs += 1
            freed += b.charged
            await cache.remove(digest, tier)
    await cache.enforce_budgets()
    return {
        "forgot_snapshots": len(forgot),
        "removed_blobs": removed_blobs,
        "removed_partials": removed_partials,
        "freed_bytes": freed,
    }


async def verify(cache: Cache, progress: Progress) -> dict[str, Any]:
    """Re-hash every complete blob in every tier; drop and report the bad ones."""
    # The digests, not Blobs: a Blob held for each of a million blobs would cost more than
    # the records themselves. Each is looked up again when its turn comes.
    listed = [(t, cache.digests(t)) for t in cache.tiers]
    progress.phase = "verify"
    total = count = 0
    for b in _copies(listed, cache):
        total += b.size
        count += 1
        if count % 4096 == 0:
            await asyncio.sleep(0)  # a tier of many blobs: let the loop breathe
    progress.fill.total_bytes = total
    progress.total_files = count
    bad: list[dict[str, str]] = []
    checked = verified = skipped = gone = 0
    for b in _copies(listed, cache):
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
        verified += 1
        checked += b.size
        progress.fill.done_bytes += b.size
        progress.done_files += 1
    return {
        "checked_blobs": verified,
        "checked_bytes": checked,
        "skipped_unreferenced": skipped,
        "bad": bad,
    }


def _copies(listed: list[tuple[Tier, Digests]], cache: Cache) -> Iterator[Blob]:
    """The complete copies still recorded of the digests listed for each tier."""
    for t, digests in listed:
        for d in digests:
            b = cache.locate(d, [t])
            if b is not None:
                yield b
