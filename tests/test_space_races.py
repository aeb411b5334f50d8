# ruff: noqa: F811  (the `work` fixture, imported)
"""Cache space under concurrency, against real daemons: what gc and eviction may take while
other operations run."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

from harness import Hostd
from test_faults import work  # noqa: F401  (a fixture)


def test_gc_during_a_publish_keeps_the_blobs_it_stored(work: Path) -> None:
    """A publish records its snapshot only at the end: gc running meanwhile must not take the
    blobs it already stored for ones no snapshot names."""
    root = work
    src = root / "src"
    src.mkdir()
    rng = random.Random(5)
    for i in range(3000):
        (src / f"s{i:04}.txt").write_bytes(rng.randbytes(3000))
    with Hostd(root / "h") as h:
        done = threading.Event()
        during: list[dict[str, Any]] = []  # gc results while blobs were stored, unnamed

        def gc_loop() -> None:
            while not done.is_set():
                _, st = h.api("GET", "/v1/status")
                if st["snapshots"] or not st["tiers"][0]["blobs"]:
                    continue  # not yet stored, or named already
                status, res = h.api("POST", "/v1/gc", {})
                assert status == 200, res
                if not done.is_set():
                    during.append(res)

        t = threading.Thread(target=gc_loop)
        t.start()
        try:
            out = h.publish(src, "x")
        finally:
            done.set()
            t.join(60)
        assert during, "no gc ran while the publish had stored blobs"
        assert sum(r["removed_blobs"] for r in during) == 0, during
        _, snaps = h.api("GET", "/v1/snapshots")
        (s,) = snaps["snapshots"]
        assert s["id"] == out["snapshot"]
        assert s["complete"], s
        assert s["tiers"]["mem"] == s["bytes"]
