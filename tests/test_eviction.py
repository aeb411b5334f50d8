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


class Columns:
    """What a cache keeps per slot and the Lru reads: a last use that moves forward, a charge."""

    def __init__(self) -> None:
        self.last_used: list[float] = []
        self.charged: list[int] = []

    def add(self, charged: int, last_used: float) -> int:
        self.last_used.append(last_used)
        self.charged.append(charged)
        return len(self.charged) - 1

    def lru(self) -> Lru:
        return Lru(self.last_used, self.charged)


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 40)),
        st.tuples(st.just("drop"), st.integers(0, 50)),
        st.tuples(st.just("use"), st.integers(0, 50)),
        st.tuples(st.just("keep"), st.integers(0, 50)),
        st.tuples(st.just("free"), st.integers(0, 50)),
        st.tuples(st.just("victims"), st.integers(-1, 400)),
        st.tuples(st.just("tick"), st.integers(0, 1)),
    ),
    max_size=60,
)


@settings(max_examples=500, deadline=None)
@given(_ops)
def test_lru_chooses_what_choose_victims_would(ops: list[tuple[str, int]]) -> None:
    """Pushes, drops, uses and holds in any order, with equally old entries (a clock that
    does not always move): the victims are those choose_victims picks from the queued
    entries not held, biggest first among equally old ones, the held ones met are taken out
    of the queue (until pushed again), and the counts stay exact."""
    cols = Columns()
    lru = cols.lru()
    queued: set[int] = set()  # slots the model says are queued
    held: set[int] = set()
    clock = 0.0
    for op, n in ops:
        if op == "tick":
            clock += n
        elif op == "push":
            slot = cols.add(n, clock)
            lru.push(slot)
            queued.add(slot)
        elif not cols.charged:
            continue
        elif op == "drop":
            slot = n % len(cols.charged)
            lru.drop(slot)
            queued.discard(slot)
        elif op == "use":
            clock += 1.0
            cols.last_used[n % len(cols.charged)] = clock
        elif op == "keep":
            held.add(n % len(cols.charged))
        elif op == "free":
            slot = n % len(cols.charged)
            held.discard(slot)
            if slot in queued:
                lru.push(slot)  # what the cache does on a release: no-op unless parked
        else:
            cands = [
                Candidate(slot, cols.charged[slot], cols.last_used[slot])
                for slot in sorted(queued - held)
            ]
            want = choose_victims(cands, n)
            got = lru.victims(n, lambda slot: slot in held)
            if want is None or got is None:
                assert got == want
            else:
                # Exactly equal entries (same age and size) may go in either order.
                key = {c.key: (c.last_used, -c.size) for c in cands}
                assert [key[k] for k in got] == [key[k] for k in want]
        live = {slot for slot in range(len(cols.charged)) if lru.queued(slot)}
        # Only held entries ever leave the queue on their own; the rest is as pushed.
        assert live <= queued
        assert queued - live <= held
        assert (len(lru), lru.bytes) == (len(live), sum(cols.charged[s] for s in live))


def test_lru_equally_old_go_biggest_first_then_first_pushed() -> None:
    cols = Columns()
    lru = cols.lru()
    for charged, used in [(10, 5.0), (30, 5.0), (20, 4.0), (30, 5.0), (1, 6.0)]:
        lru.push(cols.add(charged, used))
    assert lru.victims(1_000, lambda s: False) is None
    assert lru.victims(91, lambda s: False) == [2, 1, 3, 0, 4]
    assert lru.order() == [2, 1, 3, 0, 4]
    # A use moves an entry behind the ones used before it, when a walk meets it.
    cols.last_used[2] = 7.0
    assert lru.victims(31, lambda s: False) == [1, 3]
    assert lru.order() == [1, 3, 0, 4, 2]


def test_lru_walks_only_as_far_as_it_must() -> None:
    cols = Columns()
    lru = cols.lru()
    for i in range(50_000):
        lru.push(cols.add(10, float(i)))
    # One victim: one entry looked at, not 50,000.
    assert lru.victims(10, lambda s: False) == [0]
    assert lru.walked == 1
    # The 100 oldest were used since they were pushed: each is moved once, when met.
    for i in range(100):
        cols.last_used[i] = 100_000.0 + i
    assert lru.victims(25, lambda s: False) == [100, 101, 102]
    assert lru.walked == 1 + 100 + 3
    # Held ones are met once, then out of the queue: the next walk does not see them again.
    walked = lru.walked
    assert lru.victims(10, lambda s: s < 200) == [200]
    assert lru.walked - walked == 100 + 1
    walked = lru.walked
    assert lru.victims(10, lambda s: s < 200) == [200]
    assert lru.walked - walked == 1
    # Nothing left can free that much: None at once, with nothing walked or taken.
    walked = lru.walked
    assert lru.victims(lru.bytes + 1, lambda s: False) is None
    assert lru.walked == walked
    assert len(lru) == 50_000 - 100


def test_lru_drops_from_anywhere_and_keeps_its_order() -> None:
    cols = Columns()
    lru = cols.lru()
    for i in range(10_000):
        lru.push(cols.add(1, float(i)))
    for slot in [*range(0, 10_000, 2), *range(1, 10_000, 4)]:  # 7,500 from everywhere
        lru.drop(slot)
    assert len(lru) == 2_500
    assert lru.victims(2, lambda s: False) == [3, 7]
    assert lru.order() == list(range(3, 10_000, 4))
    assert lru.nbytes() < 30 * 10_000  # its arrays, for 10,000 slots: no object per entry
