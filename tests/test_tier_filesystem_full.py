# ruff: noqa: F811  (the `work` fixture, imported)
"""A tier whose filesystem fills up before its budget says so (something else writes there
too, or the budget is over the filesystem's size): caching is best effort, so a publish
still publishes, and leaves nothing half-written in the tier. Live: the daemon runs in a
mount namespace of its own with an 8 MiB tmpfs as its tier."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from harness import HeldOrigin, Hostd, tree_digest
from test_e2e import sample
from test_faults import in_namespace, need_root, wait_for, work  # noqa: F401  (a fixture)

from hostd import cache
from hostd.core.ids import chunk_id

pytestmark = pytest.mark.root


def _small_tmpfs_wrap(mem: Path) -> list[str]:
    """A prefix that runs the daemon in its own mount namespace, `mem` an 8 MiB tmpfs."""
    need_root()
    return in_namespace(f"mount -t tmpfs -o size=8m,mode=0700 hostd-test {mem}")


def _mem_then_disk(root: Path, mem: Path) -> list[dict[str, Any]]:
    """A mem tier at `mem` (an 8 MiB tmpfs: _small_tmpfs_wrap) under a 1 GiB budget, and a
    disk tier with room."""
    return [
        {"name": "mem", "path": str(mem), "budget": "1GiB"},
        {"name": "disk", "path": str(root / "disk"), "budget": "4GiB"},
    ]


def _daemon(root: Path, origin: str, tiers: list[dict[str, Any]], mem: Path) -> Hostd:
    """A daemon over `origin` in 1 MiB chunks, `mem` an 8 MiB tmpfs of its own."""
    return Hostd(
        root / "h", origin=origin, tiers=tiers, chunk_size="1MiB", wrap=_small_tmpfs_wrap(mem)
    )


def _tree(p: Path) -> Path:
    """30 files of 1 MiB and 200 small ones: ~31 MiB, four times the tier's filesystem."""
    p.mkdir()
    for i in range(30):
        (p / f"w{i:02d}.bin").write_bytes(os.urandom(1 << 20))
    for i in range(200):
        (p / f"s{i:03d}.txt").write_bytes(os.urandom(3000))
    return p


def test_a_publish_whose_tier_fills_up_is_published_whole_and_leaves_no_scratch(work: Path) -> None:
    root = work
    mem = root / "mem"
    mem.mkdir()
    src = _tree(root / "src")
    tiers = [{"name": "mem", "path": str(mem), "budget": "1GiB"}]
    with Hostd(root / "h", tiers=tiers, wrap=_small_tmpfs_wrap(mem)) as h:
        assert h.proc is not None
        theirs = Path(f"/proc/{h.proc.pid}/root{mem}")
        small = root / "small"
        small.mkdir()
        (small / "a.txt").write_text("a")
        h.publish(small, "t/small")  # (the room measured)
        (theirs / "other-writer").write_bytes(b"\0" * (3 << 20))  # (then taken by another)
        out = h.publish(src, "t/full")
        assert out["files"] == 230, out
        assert out["cached"] < 230, out  # (the tier could not take them all)
        for warning in out["warnings"]:  # (where the filesystem filled before it was measured)
            assert "its filesystem is full" in warning, warning
            assert "published whole all the same" in warning, warning
        # In the daemon's mount namespace: no scratch left, and what the tier counts is
        # what its blob files hold.
        assert list((theirs / "tmp").iterdir()) == []
        held = sum(p.stat().st_size for p in (theirs / "blobs").rglob("*") if p.is_file())
        _, status = h.api("GET", "/v1/status")
        (tier,) = status["tiers"]
        assert tier["used"] == held, (tier, held)
    # Another host (a daemon with room) restores it whole from the origin.
    with Hostd(root / "other", origin=f"file://{root / 'h' / 'origin'}") as other:
        got = other.restore("t/full", root / "out", mode="copy")
        assert got["event"] == "result", got
        assert tree_digest(root / "out") == tree_digest(src)


def test_a_restore_whose_mem_tier_filesystem_is_full_fills_the_next_tier(work: Path) -> None:
    """Another writer fills most of the mem tier's filesystem (a shared /dev/shm): a cold
    restore puts there what fits, the rest in the disk tier, and hands over the whole tree,
    at once and after the daemon measured the room before the other writer came. Such a
    restore used to fail on every try with 'its filesystem is full'."""
    root = work
    mem = root / "mem"
    mem.mkdir()
    src = _tree(root / "src")
    with Hostd(root / "pub") as pub:
        pub.publish(src, "t/full")
        small = root / "small"
        small.mkdir()
        (small / "a.txt").write_text("a")
        pub.publish(small, "t/small")
    tiers = _mem_then_disk(root, mem)
    origin = f"file://{root / 'pub' / 'origin'}"
    with Hostd(root / "h", origin=origin, tiers=tiers, wrap=_small_tmpfs_wrap(mem)) as h:
        assert h.proc is not None
        theirs = Path(f"/proc/{h.proc.pid}/root{mem}")
        got = h.restore("t/small", root / "first", mode="copy")  # (the room measured)
        assert got["event"] == "result", got
        (theirs / "other-writer").write_bytes(b"\0" * (3 << 20))
        for k in range(2):  # cold, then warm from where the first put it
            got = h.restore("t/full", root / f"out{k}", mode="copy")
            assert got["event"] == "result", got
            assert tree_digest(root / f"out{k}") == tree_digest(src)
        by_source = got["bytes_by_source"]
        assert by_source["origin"] == 0, by_source
        assert by_source["disk"] > 0, by_source
        _, status = h.api("GET", "/v1/status")
        used = {t["name"]: t["used"] for t in status["tiers"]}
        held = sum(p.stat().st_size for p in (theirs / "blobs").rglob("*") if p.is_file())
        assert used["mem"] == held, (used, held)
        assert list((theirs / "tmp").iterdir()) == []
        # What the operator sees: the room the filesystem leaves it, below its budget.
        mem_status = status["tiers"][0]
        assert mem_status["room"] < 8 << 20 < mem_status["budget"], mem_status
        assert sample(h.metrics(), "hostd_tier_room_bytes", tier="mem") == mem_status["room"]


MiB = 1 << 20
DEADLINE = 30.0


def _asked(http: HeldOrigin) -> Counter[str]:
    got: Counter[str] = Counter()
    while not http.asked.empty():
        got[http.asked.get_nowait()] += 1
    return got


def _published(root: Path, trees: dict[str, dict[str, bytes]]) -> Path:
    """Publish each tree (ref: {name: bytes}) in 1 MiB chunks, one origin object each (no
    packs, so that a test can hold one chunk); the origin's directory."""
    with Hostd(root / "pub", chunk_size="1MiB", pack_size=0) as pub:
        for ref, files in trees.items():
            src = root / "src" / ref
            src.mkdir(parents=True)
            for name, data in files.items():
                (src / name).write_bytes(data)
            pub.publish(src, ref)
    return root / "pub" / "origin"


def _chunks(data: bytes) -> list[bytes]:
    return [chunk_id(data[i : i + MiB]) for i in range(0, len(data), MiB)]


def test_a_blob_being_filled_takes_its_room_before_its_chunks_land(work: Path) -> None:
    """A blob being filled is charged its size when admitted, but its partial file is sparse:
    its chunks take room only as they land. The free bytes measured meanwhile counted that
    room a second time, so a restore arriving then was put in the mem tier too, and the
    first fill met a full filesystem, threw its chunks away and fetched them again."""
    root = work
    mem = root / "mem"
    mem.mkdir()
    a, b = os.urandom(6 * MiB), os.urandom(5 * MiB)
    origin = _published(root, {"t/a": {"a.bin": a}, "t/b": {"b.bin": b}, "t/s": {"s": b"s"}})
    tiers = _mem_then_disk(root, mem)
    with HeldOrigin(origin) as http, _daemon(root, http.url, tiers, mem) as h:
        assert h.restore("t/s", root / "s", mode="copy")["event"] == "result"
        first, *rest = _chunks(a)
        held = [http.hold(c) for c in rest]
        out: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: out.update(h.restore("t/a", root / "a", mode="copy")), daemon=True
        )
        worker.start()
        seen: Counter[str] = Counter()

        def fetching() -> bool:  # every chunk of a asked, the first written
            seen.update(_asked(http))
            return seen.keys() >= {c.hex() for c in _chunks(a)} or bool(out)

        def admitted() -> bool:  # a charged to the mem tier, with s
            _, status = h.api("GET", "/v1/status")
            return status["tiers"][0]["used"] == len(a) + 1 or bool(out)

        wait_for("a's fetch", fetching)
        wait_for("a's admission to the mem tier", admitted)
        time.sleep(cache.ROOM_EVERY)  # (what it measured at a's admission goes stale)
        got = h.restore("t/b", root / "b", mode="copy")
        assert got["event"] == "result", got
        for ev in held:
            ev.set()
        worker.join(DEADLINE)
        assert out["event"] == "result", out
        assert (root / "a" / "a.bin").read_bytes() == a
        assert (root / "b" / "b.bin").read_bytes() == b
        assert "its filesystem is full" not in h.log()
        seen.update(_asked(http))
        assert seen[first.hex()] == 1  # (a's chunks were not thrown away and fetched again)


def test_a_full_tier_keeps_the_partial_blobs_a_fill_has_in_another_tier(work: Path) -> None:
    """A fill that meets a full mem tier removes its partial blobs there, and goes round
    again; its partial blobs in the disk tier stay and are resumed: they were thrown away
    too, and every chunk they held fetched again."""
    root = work
    mem = root / "mem"
    mem.mkdir()
    x, y = os.urandom(12 * MiB), os.urandom(6 * MiB)  # (x more than the mem tier can hold)
    origin = _published(root, {"t/xy": {"x.bin": x, "y.bin": y}, "t/s": {"s": b"s"}})
    tiers = _mem_then_disk(root, mem)
    with HeldOrigin(origin) as http, _daemon(root, http.url, tiers, mem) as h:
        assert h.proc is not None
        theirs = Path(f"/proc/{h.proc.pid}/root{mem}")
        assert h.restore("t/s", root / "s", mode="copy")["event"] == "result"
        xs, ys = _chunks(x), _chunks(y)
        x_last, y_last = http.hold(xs[-1]), http.hold(ys[-1])
        out: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: out.update(h.restore("t/xy", root / "out", mode="copy")), daemon=True
        )
        worker.start()
        seen: Counter[str] = Counter()

        def y_written() -> bool:  # every chunk asked, and y's first five in the mem tier
            seen.update(_asked(http))
            partial = list((theirs / "partial").glob("*"))
            held = sum(p.stat().st_blocks * 512 for p in partial)
            return (seen.keys() >= {c.hex() for c in xs + ys} and held >= 5 * MiB) or bool(out)

        wait_for("y's first chunks in the mem tier", y_written)
        with contextlib.suppress(OSError), open(theirs / "other-writer", "wb") as other:
            while True:  # another writer takes the rest of the filesystem
                other.write(b"\0" * (64 << 10))
                other.flush()
        y_last.set()
        wait_for("the full filesystem", lambda: "its filesystem is full" in h.log() or bool(out))
        x_last.set()
        worker.join(DEADLINE)
        assert out["event"] == "result", out
        assert (root / "out" / "x.bin").read_bytes() == x
        assert (root / "out" / "y.bin").read_bytes() == y
        seen.update(_asked(http))
        again = [i for i, c in enumerate(xs[:-1]) if seen[c.hex()] > 1]
        assert again == [], f"x's chunks {again} were fetched again"


def test_a_promotion_into_a_tier_that_fills_up_evicts_there_and_lands(work: Path) -> None:
    """A restore that names the mem tier promotes a blob the disk tier holds. Another writer
    takes most of the mem filesystem after the daemon measured its room: the copy meets a
    full filesystem, the tier holds no more than it does from then on, and the copy is
    admitted again, evicting what no restore holds there (it used to fail the restore)."""
    root = work
    mem = root / "mem"
    mem.mkdir()
    old, new = os.urandom(4 * MiB), os.urandom(3 * MiB)
    origin = _published(root, {"t/old": {"old.bin": old}, "t/new": {"new.bin": new}})
    tiers = _mem_then_disk(root, mem)
    url = f"file://{origin}"
    with Hostd(root / "h", origin=url, tiers=tiers, wrap=_small_tmpfs_wrap(mem)) as h:
        assert h.proc is not None
        theirs = Path(f"/proc/{h.proc.pid}/root{mem}")
        assert h.restore("t/new", root / "n0", tier="disk")["event"] == "result"
        assert h.restore("t/old", root / "o0", mode="copy")["event"] == "result"  # (measured)
        (theirs / "other-writer").write_bytes(b"\0" * (7 * MiB // 2))
        got = h.restore("t/new", root / "n1", mode="copy", tier="mem")
        assert got["event"] == "result", got
        assert (root / "n1" / "new.bin").read_bytes() == new
        assert got["bytes_by_source"]["disk"] == len(new), got  # (promoted, not fetched)
        _, status = h.api("GET", "/v1/status")
        held = sum(p.stat().st_size for p in (theirs / "blobs").rglob("*") if p.is_file())
        assert status["tiers"][0]["used"] == held == len(new)  # (t/old's blob made way)
