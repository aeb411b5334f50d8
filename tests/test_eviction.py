"""Eviction choice: least recently used first, just enough to free what is needed, or None."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostd.core.eviction import Candidate, Lru, choose_victims

_candidates = st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 50)), max_size=12).map(
    lambda xs: [Candidate(key=i, size=s, last_used=float(t)) for i, (s, t) in enumerate(xs)]
)


def _freed(cands: list[Candidate[int]], keys: list[int]) -> int:
    by_key = {c.key: c for c in cands}
    return sum(by_key[k].size for k in keys)


@settings(max_examples=300, deadline=None)
@given(_candidates, st.integers(-5, 6000))
def test_victims_free_enough_lru_first_and_no_more_than_needed(
    cands: list[Candidate[int]], need: int
) -> None:
    victims = choose_victims(cands, need)
    total = sum(c.size for c in cands)
    if need <= 0:
        assert victims == []
        return
    if total < need:
        assert victims is None  # evicting everything would still not make room
        return
    assert victims is not None
    assert len(set(victims)) == len(victims)
    by_key = {c.key: c for c in cands}
    assert set(victims) <= set(by_key)
    # Frees at least `need`...
    assert _freed(cands, victims) >= need
    # ...and no more victims than needed: without the last one it would not be enough.
    assert _freed(cands, victims[:-1]) < need
    # Least recently used first, and nothing kept is older than something evicted.
    times = [by_key[k].last_used for k in victims]
    assert times == sorted(times)
    kept = [c.last_used for c in cands if c.key not in set(victims)]
    assert not kept or max(times) <= min(kept)


@settings(max_examples=100, deadline=None)
@given(_candidates, st.integers(1, 6000))
def test_input_order_does_not_change_what_is_freed(cands: list[Candidate[int]], need: int) -> None:
    a = choose_victims(cands, need)
    b = choose_victims(cands[::-1], need)
    if a is None or b is None:
        assert a is b is None
    else:
        assert (len(a), _freed(cands, a)) == (len(b), _freed(cands, b))


CANDS = [
    Candidate("a", 10, last_used=3.0),
    Candidate("b", 20, last_used=1.0),
    Candidate("c", 30, last_used=2.0),
]


@pytest.mark.parametrize(
    ("need", "expected"),
    [
        (0, []),
        (-1, []),
        (1, ["b"]),
        (20, ["b"]),
        (21, ["b", "c"]),
        (50, ["b", "c"]),
        (51, ["b", "c", "a"]),
        (60, ["b", "c", "a"]),
        (61, None),
    ],
)
def test_examples(need: int, expected: list[str] | None) -> None:
    assert choose_victims(CANDS, need) == expected


def test_nothing_to_evict() -> None:
    assert choose_victims([], 1) is None
    assert choose_victims([], 0) == []


def test_equally_old_blobs_go_biggest_first() -> None:
    cands = [Candidate("small", 1, 5.0), Candidate("big", 100, 5.0), Candidate("newer", 500, 6.0)]
    assert choose_victims(cands, 50) == ["big"]
    assert choose_victims(cands, 101) == ["big", "small"]


# -- Lru: the same choice, kept incrementally -----------------------------------------------------


class Item:
    """What a cache queues: a key, a charge, a last use that moves forward."""

    def __init__(self, key: int, charged: int, last_used: float) -> None:
        self.key, self.charged, self.last_used = key, charged, last_used
        self.queued: object = None

    def __repr__(self) -> str:
        return f"Item({self.key}, {self.charged}, {self.last_used})"


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 40)),
        st.tuples(st.just("drop"), st.integers(0, 50)),
        st.tuples(st.just("use"), st.integers(0, 50)),
        st.tuples(st.just("keep"), st.integers(0, 50)),
        st.tuples(st.just("free"), st.integers(0, 50)),
        st.tuples(st.just("victims"), st.integers(-1, 400)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_lru_chooses_what_choose_victims_would(ops: list[tuple[str, int]]) -> None:
    """Pushes, drops, uses and holds in any order: the victims are those choose_victims
    picks from the queued entries not held, the held ones met are taken out of the queue
    (until pushed again), and the counts stay exact."""
    lru: Lru[Item] = Lru()
    items: list[Item] = []
    queued: set[int] = set()  # keys the model says are queued
    held: set[int] = set()
    clock = 0.0
    for op, n in ops:
        clock += 1.0  # distinct times: the order has no ties to break
        if op == "push":
            it = Item(len(items), n, clock)
            items.append(it)
            lru.push(it)
            queued.add(it.key)
        elif not items:
            continue
        elif op == "drop":
            it = items[n % len(items)]
            lru.drop(it)
            queued.discard(it.key)
        elif op == "use":
            items[n % len(items)].last_used = clock
        elif op == "keep":
            held.add(items[n % len(items)].key)
        elif op == "free":
            it = items[n % len(items)]
            held.discard(it.key)
            if it.key in queued:
                lru.push(it)  # what the cache does on a release: no-op unless parked
        else:
            cands = [
                Candidate(it.key, it.charged, it.last_used)
                for it in items
                if it.key in queued and it.key not in held
            ]
            want = choose_victims(cands, n)
            got = lru.victims(n, lambda it: it.key in held)
            assert (None if got is None else [it.key for it in got]) == want
        live = [it for it in items if it.queued is not None]
        # Only held entries ever leave the queue on their own; the rest is as pushed.
        assert {it.key for it in live} <= queued
        assert queued - {it.key for it in live} <= held
        assert (len(lru), lru.bytes) == (len(live), sum(it.charged for it in live))


def test_lru_walks_only_as_far_as_it_must() -> None:
    lru: Lru[Item] = Lru()
    items = [Item(i, 10, float(i)) for i in range(50_000)]
    for it in items:
        lru.push(it)
    # One victim: one entry looked at, not 50,000.
    assert [it.key for it in lru.victims(10, lambda it: False) or []] == [0]
    assert lru.walked == 1
    # The 100 oldest were used since they were pushed: each is moved once, when met.
    for it in items[:100]:
        it.last_used = 100_000.0 + it.key
    got = lru.victims(25, lambda it: False)
    assert [it.key for it in got or []] == [100, 101, 102]
    assert lru.walked == 1 + 100 + 3
    # Held ones are met once, then out of the queue: the next walk does not see them again.
    walked = lru.walked
    assert [it.key for it in lru.victims(10, lambda it: it.key < 200) or []] == [200]
    assert lru.walked - walked == 100 + 1
    walked = lru.walked
    assert [it.key for it in lru.victims(10, lambda it: it.key < 200) or []] == [200]
    assert lru.walked - walked == 1
    # Nothing left can free that much: None at once, with nothing walked or taken.
    walked = lru.walked
    assert lru.victims(lru.bytes + 1, lambda it: False) is None
    assert lru.walked == walked
    assert len(lru) == 50_000 - 100


def test_lru_sweeps_stale_entries_left_by_drops() -> None:
    lru: Lru[Item] = Lru()
    items = [Item(i, 1, float(i)) for i in range(10_000)]
    for it in items:
        lru.push(it)
    for it in items[::2] + items[1::4]:  # 7,500 dropped from everywhere in the heap
        lru.drop(it)
    assert len(lru) == 2_500
    assert len(lru._heap) <= 2 * len(lru) + 1024
    assert [it.key for it in lru.victims(2, lambda it: False) or []] == [3, 7]
