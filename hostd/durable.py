"""Blobs made durable in batches, then recorded: the order a power cut cannot break.

A fill writes each blob and names it in blobs/ (a rename, or a link of an unnamed file) with no
fsync of its own (Tier.write_wholes, PartialBlob.complete and Tier.copy_in with
`durable=False`), and the cache takes it as
complete in memory at once, so a running restore can use it. `Durability` collects those
blobs, makes a batch durable with one Tier.sync (a syncfs of the tier's filesystem: data,
inodes and names), and only after that returns writes the batch's index rows, in one
transaction. So after a crash or a power cut a blob is either recorded and intact, or not
recorded; a blob file with no row is re-hashed before its first use (Cache.load).

A batch goes when it holds `max_blobs` blobs, when its oldest is `max_delay` seconds old (a
timer, so a fill stalled on a slow origin does not hold its last blobs unrecorded), and
whenever a caller needs its blobs recorded (`flush`, at the end of every Filler.ensure). One
sync runs at a time, as a task this object owns; blobs added meanwhile wait for the next. A
fill that gets `backlog` blobs ahead of the disk waits for it.

A failed sync cannot say which blob it lost, so its batch and everything waiting on that tier
is dropped (records and files: fetched again when next asked for), and the tier's next batch
is also fsynced blob by blob, which reports an error a blob written during the failed sync
met and the syncfs no longer would (it was reported once, to that sync). For the same
reason a batch whose tier another caller's sync failed on (a re-hash's, a publish's) since
any of its blobs began to be written counts as failed too (`Tier.failed_syncs`, sampled
before the first byte: write-back starts while a blob is written): that sync may have been
told the batch's own write-back error.

It must not: write a row before the sync covering its blob has returned; record a blob that
is no longer the cache's record (Cache.record_durable skips those, and writes the rest on the
index's writer thread); block the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from hostd.cache import Blob, Cache
from hostd.errors import TierError
from hostd.tier import Tier

log = logging.getLogger(__name__)

# A batch is synced once it holds this many blobs (more gather while a sync runs). A syncfs
# costs about one journal commit and one disk cache flush however many blobs it covers (a few
# ms on NVMe, tens on a loaded disk), so 256 small blobs bring it to microseconds each, the
# batch's rows commit in about a millisecond, and a restart after a crash re-hashes at most a
# few batches of unrecorded blobs.
MAX_BLOBS = 256
# ... and its oldest blob at most this old, so a slow trickle (big files, a slow origin) is
# recorded soon after it lands, and a syncfs never has much dirty data to write back.
MAX_DELAY = 0.05
# Blobs waiting while a sync runs, beyond which the fill waits for it: the disk is behind.
BACKLOG = 4 * MAX_BLOBS


@dataclass
class DurabilityStats:
    syncs: int = 0
    blobs: int = 0  # recorded after a sync
    dropped: int = 0  # lost to a failed sync
    failures: int = 0
    last_failure: str = ""


class Durability:
    def __init__(
        self,
        cache: Cache,
        *,
        max_blobs: int = MAX_BLOBS,
        max_delay: float = MAX_DELAY,
        backlog: int = BACKLOG,
    ) -> None:
        self.cache = cache
        self.max_blobs = max_blobs
        self.max_delay = max_delay
        self.backlog = backlog
        self.stats = DurabilityStats()
        self._pending: list[Blob] = []
        # Armed while blobs wait: their sync starts `max_delay` after the first of them came,
        # or as soon as the running one ends if that is later (`_overdue`).
        self._timer: asyncio.TimerHandle | None = None
        self._overdue = False
        self._added = 0  # blobs ever added
        self._settled = 0  # of those, the first so many were synced (recorded, or dropped)
        self._flight: asyncio.Task[None] | None = None
        # Blobs added and not yet synced (the running sync's included), by id: what `flush`
        # of a given set of blobs looks for.
        self._unsynced: set[int] = set()
        self._suspect: set[str] = set()  # tiers whose last sync failed: check blob by blob
        # Each tier's count of failed syncs before any of its pending blobs was written: one
        # that moved by the time this object's sync passed failed for another caller, which
        # may have been told this batch's write-back error (it is told once)
        self._failed_at: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"Durability(pending={len(self._pending)}, syncing={self._flight is not None}, "
            f"syncs={self.stats.syncs})"
        )

    @property
    def pending(self) -> int:
        """Blobs complete in memory whose rows wait for a sync (the running one's excluded)."""
        return len(self._pending)

    @property
    def syncing(self) -> bool:
        return self._flight is not None

    def add(self, b: Blob, failed_at: int | None = None) -> None:
        """A blob installed with `durable=False` and recorded with `persist=False`.
        `failed_at`: its tier's `failed_syncs` from before the blob's first byte was written
        (a sync that failed while it was written may have been told its error); else now."""
        if self._timer is None and not self._pending:
            self._timer = asyncio.get_running_loop().call_later(self.max_delay, self._on_time)
        at = b.tier.failed_syncs if failed_at is None else failed_at
        self._failed_at[b.tier.name] = min(self._failed_at.get(b.tier.name, at), at)
        self._pending.append(b)
        self._unsynced.add(id(b))
        self._added += 1

    def kick(self) -> None:
        """Start a sync of what waits, unless one runs (it is owned here, awaited by the next
        flush or by close). Synchronous: safe on an exit path, cancellation included."""
        if self._flight is None and self._pending:
            self._start()

    async def step(self) -> None:
        """After adding blobs: start a sync if a full batch waits and none runs; wait for
        the syncs if the backlog is too long."""
        if self._flight is None and len(self._pending) >= self.max_blobs:
            self._start()
        if len(self._pending) >= self.backlog:
            await self.flush()

    async def flush(self, blobs: Iterable[Blob] | None = None) -> None:
        """Return once every blob added before this call is durable and recorded, or was
        dropped by a failed sync (TierError, naming the tier, if the sync this waited on
        failed). Given `blobs`, at once if none of them waits for a sync (a warm restore
        need not wait for another's). A cancelled caller leaves the sync running."""
        if not self._unsynced or (
            blobs is not None and not any(id(b) in self._unsynced for b in blobs)
        ):
            return
        target = self._added
        while self._settled < target:
            if self._flight is not None and self._flight.done():
                # It ended short of `target` (blobs came while it ran) and its _landed has
                # not run yet: awaiting it again would not yield, and this would spin.
                self._flight.result()  # the failure it ended with, if any
                self._flight = None
            if self._flight is None:
                self._start()
            assert self._flight is not None
            await asyncio.shield(self._flight)

    async def close(self) -> None:
        """Sync and record everything still waiting (at shutdown); a failure is logged."""
        try:
            await self.flush()
        except TierError as e:
            log.error("blobs not recorded at shutdown: %s", e.message)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # the sync -------------------------------------------------------------------------------
    def _on_time(self) -> None:
        self._timer = None
        if self._flight is None:
            self.kick()
        else:
            self._overdue = True

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._overdue = False
        batch, self._pending = self._pending, []
        failed_at, self._failed_at = self._failed_at, {}
        flight = asyncio.create_task(self._sync(batch, self._added, failed_at))
        self._flight = flight
        flight.add_done_callback(self._landed)

    def _landed(self, flight: asyncio.Task[None]) -> None:
        if self._flight is flight:
            self._flight = None
        if not flight.cancelled():
            flight.exception()  # retrieved: the waiters (if any) re-raise it themselves
        if self._flight is None and self._pending:
            if self._overdue or len(self._pending) >= self.max_blobs:
                self._start()
            elif self._timer is None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self.max_delay, self._on_time)

    async def _sync(self, batch: list[Blob], end: int, failed_at: dict[str, int]) -> None:
        tiers: dict[str, tuple[Tier, list[bytes]]] = {}
        for b in batch:
            tiers.setdefault(b.tier.name, (b.tier, []))[1].append(b.digest)
        suspect = set(self._suspect)
        failed = await asyncio.to_thread(_sync_tiers, list(tiers.values()), suspect, failed_at)
        self._suspect -= set(tiers) - set(failed)
        self._suspect |= set(failed)
        self.stats.syncs += bool(tiers)
        # Nothing awaits from here to the end of the recording: no blob is added, evicted or
        # dropped between the sync's verdict and the rows.
        good = [b for b in batch if b.tier.name not in failed]
        written = self.cache.record_durable(good)
        self._unsynced.difference_update(id(b) for b in batch)
        self.stats.blobs += len(good)
        # The rows are written on the index's writer thread; a flush returns once they are.
        # One that fails is logged there: its blobs stay unrecorded, so re-hashed before use.
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(written)
        self._settled = end
        if not failed:
            return
        # A failed sync may have lost any blob of that tier written before it returned:
        # those of this batch and those waiting for the next.
        lost = [b for b in batch if b.tier.name in failed]
        lost += [b for b in self._pending if b.tier.name in failed]
        # (a flush that counted on them starts a sync of what is left, which settles them)
        self._pending = [b for b in self._pending if b.tier.name not in failed]
        for name in failed:  # (none of its blobs waits now: the next one added counts anew)
            self._failed_at.pop(name, None)
        self._unsynced.difference_update(id(b) for b in lost)
        self.stats.dropped += len(lost)
        first = next(iter(failed.values()))
        self.stats.failures += 1
        self.stats.last_failure = first.message
        log.error("%s; dropping %d blobs it may have lost", first.message, len(lost))
        for b in lost:
            if any(c is b for c in self.cache.copies(b.digest)):
                await self.cache.remove(b.digest, b.tier)
        raise first


def _sync_tiers(
    tiers: list[tuple[Tier, list[bytes]]], suspect: set[str], failed_at: dict[str, int]
) -> dict[str, TierError]:
    """Sync each tier (blocking); the failures, by tier name. A tier another caller's sync
    failed on since before the batch's first byte was written (`failed_at`) counts as failed
    too (Tier.failed_since)."""
    failed: dict[str, TierError] = {}
    for t, digests in tiers:
        try:
            t.sync(digests, each=t.name in suspect)
        except TierError as e:
            failed[t.name] = e
            continue
        if (theirs := t.failed_since(failed_at.get(t.name, t.failed_syncs))) is not None:
            failed[t.name] = theirs
    return failed
