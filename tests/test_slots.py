"""The compact digest → slot map: the same answers as a dict, whatever the order of adds and
removes, with slots reused and no pass over all keys to grow.

Each case runs against both twins (the `cls` fixture): the pure-Python PyDigestSlots and the
compiled one (native/slots.c), skipped where the extension was not built, failed instead
under CI=true. The parity cases run both side by side on the same calls and want the same
slots, keys and errors: callers index their own columns by slot.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostd.core import slots as slots_module
from hostd.core.slots import MAX_WIDTH, SHARDS, DigestSlots, PyDigestSlots, Slots

ROOT = Path(__file__).resolve().parent.parent


def digest(i: int) -> bytes:
    return blake3.blake3(i.to_bytes(4, "little")).digest()


def _native() -> type[Slots]:
    native = slots_module.NativeDigestSlots
    if native is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {slots_module.WHY_NOT_NATIVE}; CI has gcc, so it must build")
        pytest.skip(slots_module.WHY_NOT_NATIVE)
    return native


@pytest.fixture(scope="module", params=["python", "native"])
def cls(request: pytest.FixtureRequest) -> type[Slots]:
    """Each twin in turn (module-scoped: Hypothesis reruns a test with one instance)."""
    return PyDigestSlots if request.param == "python" else _native()


# -- each twin on its own ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300)), max_size=400))
def test_answers_as_a_dict_would(cls: type[Slots], ops: list[tuple[bool, int]]) -> None:
    slots = cls()
    model: dict[bytes, int] = {}
    free: list[int] = []  # freed slots: the last one freed is given out first
    for add, i in ops:
        d = digest(i)
        if add and d not in model:
            s = slots.add(d)
            assert s == (free.pop() if free else slots.capacity - 1)
            assert s not in model.values()  # a slot is never given twice
            model[d] = s
        elif not add and d in model:
            s = model.pop(d)
            slots.remove(s)
            free.append(s)
        assert len(slots) == slots.count == len(model)
    for i in range(301):
        assert slots.find(digest(i)) == model.get(digest(i), -1)
    assert sorted(slots.slots()) == sorted(model.values())
    assert all(slots.key(s) == d for d, s in model.items())
    assert slots.capacity == len(model) + len(free)


def test_many_keys_and_their_removal(cls: type[Slots]) -> None:
    slots = cls()
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


def test_put_finds_a_present_key_and_adds_an_absent_one(cls: type[Slots]) -> None:
    slots = cls(32)
    a, b, c = (digest(i) for i in range(3))
    sa = slots.put(a)
    assert (slots.put(a), len(slots)) == (sa, 1)
    sb = slots.add(b)
    slots.remove(sa)
    assert slots.put(c) == sa  # the freed slot, given out again
    assert (slots.find(a), slots.find(b), slots.find(c)) == (-1, sb, sa)
    assert (slots.put(b), len(slots)) == (sb, 2)
    assert repr(slots) == "DigestSlots(2 keys, 2 slots)"


def test_a_key_of_the_wrong_width_is_refused(cls: type[Slots]) -> None:
    slots = cls()
    with pytest.raises(ValueError, match="a key of 5 bytes, want 32"):
        slots.add(b"short")
    with pytest.raises(ValueError, match="a key of 33 bytes, want 32"):
        slots.put(bytes(33))
    assert slots.find(b"short") == -1  # no such key
    assert (len(slots), slots.capacity) == (0, 0)


@pytest.mark.parametrize("width", [0, -1, MAX_WIDTH + 1])
def test_a_width_out_of_range_is_refused(cls: type[Slots], width: int) -> None:
    with pytest.raises(ValueError, match="a width of"):
        cls(width)


def test_bad_slots_are_errors(cls: type[Slots]) -> None:
    slots = cls(4)
    for k in (b"aaaa", b"bbbb", b"cccc"):
        slots.add(k)
    slots.remove(1)
    for bad in (-1, 3, 1 << 40, -(1 << 70)):
        with pytest.raises(IndexError, match="out of range"):
            slots.key(bad)
        with pytest.raises(IndexError, match="out of range"):
            slots.remove(bad)
    with pytest.raises(ValueError, match="slot 1 holds no key"):
        slots.remove(1)  # freed already
    assert slots.key(1) == b"bbbb"  # a freed slot's last key
    assert (len(slots), slots.capacity, sorted(slots.slots())) == (2, 3, [0, 2])
    assert slots.add(b"dddd") == 1
    slots.remove(1)
    with pytest.raises(ValueError, match="slot 1 holds no key"):
        slots.remove(1)


def test_a_freed_slot_whose_last_key_lives_elsewhere_holds_no_key(cls: type[Slots]) -> None:
    slots = cls(4)
    slots.add(b"aaaa")
    slots.add(b"bbbb")
    slots.remove(0)
    slots.remove(1)
    assert slots.add(b"aaaa") == 1  # the last freed
    assert slots.key(0) == b"aaaa"  # slot 0's last key, held now by slot 1
    with pytest.raises(ValueError, match="slot 0 holds no key"):
        slots.remove(0)
    assert (slots.find(b"aaaa"), len(slots)) == (1, 1)


# -- the twins side by side ----------------------------------------------------------------

OPS = ("add", "put", "find", "remove", "forget", "key", "bulk")


def _key(i: int, width: int) -> bytes:
    """Digests for width 32; for the others, little-endian counters: keys that share most of
    their bytes, and (width 1 and 3) few enough to meet again."""
    if width == 32:
        return digest(i)
    return (i % (1 << (8 * width))).to_bytes(width, "little")


def _outcome(call: Callable[[], object]) -> object:
    """What a call gave: its value, or the type of its IndexError or ValueError."""
    try:
        return call()
    except (IndexError, ValueError) as e:
        return type(e)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([1, 3, 4, 8, 13, 32]),
    st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 1 << 16)), max_size=200),
)
def test_the_twins_give_the_same_slots(width: int, ops: list[tuple[str, int]]) -> None:
    """Random calls on both, the same answers (errors included), checked against a dict and
    a stack of freed slots; keys narrow enough to meet again, and bulk puts that grow shards."""
    twins: list[Slots] = [PyDigestSlots(width), _native()(width)]
    py, native = twins
    model: dict[bytes, int] = {}
    free: list[int] = []
    fresh = 1 << 20  # bulk keys: never met before

    def gives(method: str, arg: int | bytes) -> object:
        """What both twins gave `method(arg)`, checked to be the same."""
        a, b = (_outcome(partial(getattr(t, method), arg)) for t in twins)
        assert a == b, (method, arg, a, b)
        return a

    def added(k: bytes, s: object) -> None:
        assert isinstance(s, int)
        if k in model:
            assert s == model[k]
        else:
            assert s == (free.pop() if free else py.capacity - 1)
            model[k] = s

    def removed(s: int) -> None:
        assert gives("remove", s) is None
        del model[py.key(s)]
        free.append(s)

    for op, i in ops:
        k = _key(i % 600, width)
        if op == "add" and k not in model:  # add takes absent keys only
            added(k, gives("add", k))
        elif op == "put":
            added(k, gives("put", k))
        elif op == "find" or op == "add":
            assert gives("find", k) == model.get(k, -1)
        elif op == "remove" and model:
            removed(sorted(model.values())[i % len(model)])
        elif op == "forget":  # any slot, freed or not, or out of range: the same error
            s = i % (py.capacity + 2) - 1
            if gives("remove", s) is None:
                del model[py.key(s)]
                free.append(s)
        elif op == "key":  # a freed slot's last key, or out of range
            s = i % (py.capacity + 2) - 1
            gives("key", s)
        elif op == "bulk":  # enough keys to grow many shards, then tombstones
            n = i % 4000
            for j in range(n):
                k = _key(fresh + j, width)
                added(k, gives("put", k))
            for j in range(0, n, 3):
                held = model.get(_key(fresh + j, width))
                if held is not None:
                    removed(held)
            fresh += n
        assert len(py) == len(native) == len(model)
        assert py.capacity == native.capacity == len(model) + len(free)
    for t in twins:
        assert sorted(t.slots()) == sorted(model.values())
        assert all(t.key(s) == k and t.find(k) == s for k, s in model.items())
    assert repr(py) == repr(native)


def test_the_twins_give_the_same_slots_through_growth_and_churn() -> None:
    """Four waves of 50,000 keys of 4 bytes (counters: most bytes shared), a third of each
    removed: every shard grows and sheds its tombstones, and slots go round the free list."""
    py, native = PyDigestSlots(4), _native()(4)
    for wave in range(4):
        keys = [(wave * 37_000 + i).to_bytes(4, "little") for i in range(50_000)]
        assert [py.put(k) for k in keys] == [native.put(k) for k in keys]
        gone = [py.find(k) for k in keys[wave::3]]
        assert gone == [native.find(k) for k in keys[wave::3]]
        for s in gone:
            py.remove(s)
            native.remove(s)
        assert (len(py), py.capacity) == (len(native), native.capacity)
    assert sorted(py.slots()) == sorted(native.slots())
    assert all(py.key(s) == native.key(s) for s in range(py.capacity))
    assert native.nbytes() < 4 * native.capacity + 12 * len(native) + 32 * SHARDS


# -- the compiled twin -----------------------------------------------------------------------


def test_the_compiled_twin_takes_any_buffer_of_the_width() -> None:
    _native()
    from hostd._slots import DigestSlots as Native

    slots = Native(4)
    s = slots.add(bytearray(b"abcd"))
    assert slots.find(memoryview(b"xabcd")[1:]) == s
    assert slots.put(memoryview(b"abcd")) == s
    assert slots.key(s) == b"abcd"
    with pytest.raises(TypeError):
        slots.find("abcd")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        slots.key("0")  # type: ignore[arg-type]


def test_changing_the_compiled_twin_while_iterating_is_safe() -> None:
    slots = _native()(8)
    for i in range(5_000):
        slots.add(i.to_bytes(8, "little"))
    seen = []
    for s in slots.slots():  # removing and adding grows and rehashes shards under it
        seen.append(s)
        if len(seen) % 2:
            slots.remove(s)
            slots.add((10_000 + s).to_bytes(8, "little"))
            slots.add((20_000 + s).to_bytes(8, "little"))
    assert len(seen) >= 5_000 // 2
    assert sorted(slots.slots()) == list(range(slots.capacity))


def test_keys_picked_to_collide_cost_no_more_than_random_ones(
    cls: type[Slots],
) -> None:
    """Keys come from manifests before their bytes are verified. A first word equal to
    the hash's constant P1 zeroes its first multiply, so with unkeyed constants the next 8
    bytes would vanish from the hash: 2**64 keys of one hash, each add and find a walk over
    all of them (30,000 such keys: most of a second of the GIL, against milliseconds)."""
    first_word = 0xE7037ED1A0B428DB.to_bytes(8, "little")
    picked = [first_word + i.to_bytes(8, "little") + bytes(16) for i in range(30_000)]
    spread = [digest(i) for i in range(30_000)]

    def cost(keys: list[bytes]) -> float:
        slots = cls()
        start = time.thread_time()
        for k in keys:
            slots.add(k)
        assert all(slots.find(k) == s for s, k in enumerate(keys))
        return time.thread_time() - start

    assert cost(picked) < 5 * cost(spread) + 0.2


def _imported(env: dict[str, str], code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_digest_slots_is_the_compiled_twin_where_it_was_built() -> None:
    native = _native()
    if os.environ.get("HOSTD_NATIVE") != "0":
        assert DigestSlots is native
        assert slots_module.IMPLEMENTATION == "native"
    code = "from hostd.core import slots; print(slots.IMPLEMENTATION, slots.DigestSlots())"
    assert _imported({"HOSTD_NATIVE": "1"}, code) == "native DigestSlots(0 keys, 0 slots)"
    assert _imported({"HOSTD_NATIVE": "0"}, code) == "python DigestSlots(0 keys, 0 slots)"
