"""Eviction choice: which blobs leave a tier so that it fits its budget. Pure.

The order is least recently used first, and of equally old ones the biggest first (fewer
victims). `choose_victims` applies it to a list of candidates; `Lru` keeps one tier's
entries in that order as they come, go and are used, so a choice costs O(v log n) for v
victims instead of a sort of the whole tier.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Candidate(Generic[K]):
    key: K
    size: int
    last_used: float


def choose_victims(candidates: Sequence[Candidate[K]], need: int) -> list[K] | None:
    """Least recently used first, until at least `need` bytes are freed.

    `candidates` holds only what may go (not pinned, not in use). None when even all of them
    would not free enough: the caller then tries another tier instead of evicting for nothing.
    """
    return take(sorted(candidates, key=lambda c: (c.last_used, -c.size)), need)


def take(ordered: Iterable[Candidate[K]], need: int) -> list[K] | None:
    """The first of `ordered` that together free `need` bytes; None if all of them do not."""
    if need <= 0:
        return []
    chosen: list[K] = []
    freed = 0
    for c in ordered:
        chosen.append(c.key)
        freed += c.size
        if freed >= need:
            return chosen
    return None


class Queued(Protocol):
    """What an Lru orders. `last_used` may move forward while queued (a use: the entry is
    moved when a walk meets it); `charged` must not change while queued (drop, change, push).
    `queued` belongs to the Lru: its live entry, None when not queued."""

    last_used: float
    charged: int
    queued: Any


E = TypeVar("E", bound=Queued)

# (last_used, -charged, ticket, item): the ticket is unique, so items are never compared.
_Entry = tuple[float, int, int, Any]


class Lru(Generic[E]):
    """One tier's evictable entries, least recently used first: a heap whose stale entries
    (dropped, or used since they were pushed) are skipped or moved when a walk meets them.

    push and drop are O(log n) and O(1); a use costs nothing until a walk meets the entry;
    `victims` pops only as far as it must. `bytes` is the sum of what the queued entries are
    charged; `walked` counts the entries walks have looked at (tests count work with it).
    """

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._tickets = itertools.count()
        self.count = 0
        self.bytes = 0
        self.walked = 0

    def __repr__(self) -> str:
        return f"Lru({self.count} entries, {self.bytes} bytes, heap={len(self._heap)})"

    def __len__(self) -> int:
        return self.count

    def push(self, e: E) -> None:
        """Queue `e` (nothing if it is queued already)."""
        if e.queued is not None:
            return
        entry = (e.last_used, -e.charged, next(self._tickets), e)
        e.queued = entry
        heapq.heappush(self._heap, entry)
        self.count += 1
        self.bytes += e.charged

    def drop(self, e: E) -> None:
        """Take `e` out of the queue (nothing if it is not queued). Its heap entry stays
        behind, stale, until a walk pops it or the heap is compacted."""
        entry = e.queued
        if entry is None:
            return
        e.queued = None
        self.count -= 1
        self.bytes += entry[1]
        if self._heap[0] is entry:  # an evicted victim, most often: gone at once
            heapq.heappop(self._heap)
        # Other stale entries are popped by the walks that meet them, or swept when they
        # outnumber the live ones (removals from the middle: gc).
        elif len(self._heap) > 2 * self.count + 1024:
            self._heap = [x for x in self._heap if x[3].queued is x]
            heapq.heapify(self._heap)

    def victims(self, need: int, keep: Callable[[E], bool]) -> list[E] | None:
        """The least recently used entries (equally old: the biggest first) that together
        free `need` bytes, or None if all the others would not (nothing is taken then).

        An entry `keep` says must stay (pinned, in use) is dropped from the queue on the
        way, so later walks do not meet it again: the caller pushes it back once it may go.
        The victims stay queued until the caller drops them (it may not evict them all).
        """
        if need <= 0:
            return []
        chosen: list[_Entry] = []
        freed = 0
        try:
            while freed < need:
                if self.bytes < need or not self._heap:
                    return None  # what is left, the chosen included, is not enough
                entry = heapq.heappop(self._heap)
                self.walked += 1
                e = entry[3]
                if e.queued is not entry:
                    continue  # dropped, or pushed again since
                if entry[0] != e.last_used:  # used since it was pushed: move it
                    e.queued = None
                    self.count -= 1
                    self.bytes += entry[1]
                    self.push(e)
                    continue
                if keep(e):
                    e.queued = None
                    self.count -= 1
                    self.bytes += entry[1]
                    continue
                chosen.append(entry)
                freed -= entry[1]
            return [entry[3] for entry in chosen]
        finally:
            for entry in chosen:  # still queued: back where they were
                heapq.heappush(self._heap, entry)
