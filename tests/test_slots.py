"""The compact digest → slot map: the same answers as a dict, whatever the order of adds and
removes, with slots reused and no pass over all keys to grow."""

from __future__ import annotations

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostd.core.slots import SHARDS, DigestSlots


def digest(i: int) -> bytes:
    return blake3.blake3(i.to_bytes(4, "little")).digest()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300)), max_size=400))
def test_answers_as_a_dict_would(ops: list[tuple[bool, int]]) -> None:
    slots = DigestSlots()
    model: dict[bytes, int] = {}
    for add, i in ops:
        d = digest(i)
        if add and d not in model:
            s = slots.add(d)
            assert s not in model.values()  # a slot is never given twice
            model[d] = s
        elif not add and d in model:
            slots.remove(model.pop(d))
        assert len(slots) == len(model)
    for i in range(301):
        assert slots.find(digest(i)) == model.get(digest(i), -1)
    assert sorted(slots.slots()) == sorted(model.values())
    assert all(slots.key(s) == d for d, s in model.items())
    # freed slots are given out again before new ones
    assert slots.capacity <= max([*model.values(), -1]) + 1 + len(slots._free)


def test_many_keys_and_their_removal() -> None:
    slots = DigestSlots()
    ds = [digest(i) for i in range(50_000)]
    got = [slots.add(d) for d in ds]
    assert got == list(range(50_000))
    for d in ds[::2]:
        slots.remove(slots.find(d))
    assert [slots.find(d) for d in ds[:6]] == [-1, 1, -1, 3, -1, 5]
    # Removed keys' slots are reused; the capacity does not grow.
    again = [slots.add(digest(100_000 + i)) for i in range(25_000)]
    assert sorted(again) == list(range(0, 50_000, 2))
    assert slots.capacity == 50_000
    assert len(slots) == 50_000
    # ~32 bytes of key and a few of index per key: no Python object per key.
    assert slots.nbytes() < 50 * 50_000 + 8 * SHARDS * 4


def test_a_key_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match="5 bytes"):
        DigestSlots().add(b"short")
